"""The transformers backend: batched sampling with a KV cache, left padding, and one prefill per prompt shared
by its n samples (the cache is repeated after the prefill). It generates with the live training model, so
``update_weights`` has nothing to copy."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from align.attention import gqa_attention
from align.rollout import Completion, Prompt, SamplingParams, encode_prompt
from align.rollout.decode import llama_decoder


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


class HFEngine:
    def __init__(self, model, tokenizer, batch_size: int = 64, fast: bool = True):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.fast = fast  # the lean decoder (align.rollout.decode) where it applies; False: transformers' forward

    def update_weights(self, model) -> None:
        self.model = model  # same live module: nothing to copy

    def sleep(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def wake(self) -> None:
        pass

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Prompt], n: int = 1, sampling: SamplingParams | None = None
    ) -> list[list[Completion]]:
        sampling = sampling or SamplingParams()
        ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        device = next(self.model.parameters()).device
        gen = None
        if sampling.seed is not None:  # the sampling noise is drawn where the logits are, from a seeded generator
            gen = torch.Generator(device=device).manual_seed(sampling.seed)
        out: list[list[Completion]] = []
        per_chunk = max(1, self.batch_size // n)
        was_training = self.model.training
        self.model.eval()
        try:
            decoder = self._decoder() if self.fast else None  # weights rearranged once per call
            with gqa_attention(self.model):
                for s in range(0, len(ids), per_chunk):
                    chunk = ids[s : s + per_chunk]
                    state = gen.get_state() if gen is not None else None
                    try:
                        out.extend(self._generate_chunk(chunk, n, sampling, gen, decoder))
                    except RuntimeError:  # (out of memory included) the lean path failed: transformers' forward
                        if decoder is None:
                            raise
                        decoder = None
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        if state is not None:
                            gen.set_state(state)
                        out.extend(self._generate_chunk(chunk, n, sampling, gen, None))
        finally:
            self.model.train(was_training)
        return out

    def _decoder(self):
        """The lean decoder over the current weights, or None (not applicable, not affordable, or it failed)."""
        try:
            return llama_decoder(self.model)
        except (RuntimeError, ValueError, TypeError, AttributeError):  # out of memory, an unexpected layout
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None

    def _generate_chunk(
        self, prompt_ids: list[list[int]], n: int, sp: SamplingParams, gen, decoder
    ) -> list[list[Completion]]:
        from transformers import DynamicCache

        model, tok = self.model, self.tokenizer
        device = next(model.parameters()).device
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
        attn = torch.zeros_like(input_ids)
        for i, p in enumerate(prompt_ids):  # left padding
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        input_ids, attn = input_ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        fast = decoder if decoder is not None and decoder.fits(width + sp.max_new_tokens) else None
        if fast is not None:
            logits = fast.prefill(input_ids, attn, pos, n, sp.max_new_tokens)
            attn, pos = attn.repeat_interleave(n, 0), pos.repeat_interleave(n, 0)
        else:
            cache = DynamicCache()
            logits = model(
                input_ids=input_ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True
            ).logits[:, -1]
            # share the prefill: repeat cache, mask and last logits n times (sample k of prompt i is row i*n + k)
            if n > 1:
                cache.batch_repeat_interleave(n)
                attn, logits, pos = (
                    attn.repeat_interleave(n, 0),
                    logits.repeat_interleave(n, 0),
                    pos.repeat_interleave(n, 0),
                )
        rows = attn.size(0)
        next_pos = pos[:, -1:] + 1
        stop_ids = torch.tensor(
            sorted({*sp.stop_token_ids, *([tok.eos_token_id] if tok.eos_token_id is not None else [])}), device=device
        )
        tokens = torch.zeros((rows, sp.max_new_tokens), dtype=torch.long, device=device)
        logps = torch.zeros((rows, sp.max_new_tokens), device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        lengths = torch.full((rows,), sp.max_new_tokens, dtype=torch.long, device=device)
        texts_done = [False] * rows
        suppress = torch.tensor(sp.suppress_token_ids, dtype=torch.long, device=device)
        k = min(sp.top_logprobs, logits.size(-1))
        top_v = torch.zeros((rows, sp.max_new_tokens, k), device=device)
        top_i = torch.zeros((rows, sp.max_new_tokens, k), dtype=torch.long, device=device)
        for t in range(sp.max_new_tokens):
            logits = logits.float()
            raw = logits.log_softmax(-1)
            if k:
                top_v[:, t], top_i[:, t] = raw.topk(k, dim=-1)
            if len(suppress):
                logits = logits.index_fill(-1, suppress, float("-inf"))
            if sp.temperature <= 0:
                nxt = logits.argmax(-1)
            else:
                # Gumbel-max: argmax(z + G), G = -log(-log U), draws from softmax(z) (uniform draws are cheaper
                # than multinomial's exponential ones); U comes from the seeded CPU generator
                z = _filter(logits / sp.temperature if sp.temperature != 1.0 else logits, sp.top_k, sp.top_p)
                u = torch.rand(z.shape, generator=gen, device=device)
                nxt = (z - u.log_().neg_().log_()).argmax(-1)
            tokens[:, t] = nxt  # (rows already done keep sampling; their tokens past the stop are never returned)
            logps[:, t] = raw.gather(-1, nxt[:, None]).squeeze(-1)
            newly = ~done & torch.isin(nxt, stop_ids)
            lengths = torch.where(newly, torch.full_like(lengths, t + 1), lengths)
            done |= newly
            if sp.stop:  # stop strings need the text: checked only for the rows still running
                for r in (~done).nonzero().flatten().tolist():
                    text = tok.decode(tokens[r, : t + 1].tolist())
                    if any(s in text for s in sp.stop):
                        done[r], lengths[r], texts_done[r] = True, t + 1, True
            if bool(done.all()) or t == sp.max_new_tokens - 1:
                break
            if fast is not None:
                logits = fast.step(nxt, next_pos)
            else:
                attn = torch.cat([attn, (~done).long()[:, None]], dim=1)
                logits = model(
                    input_ids=nxt[:, None],
                    attention_mask=attn,
                    position_ids=next_pos,
                    past_key_values=cache,
                    use_cache=True,
                ).logits[:, -1]
            next_pos = next_pos + 1
        tokens, logps, lengths, top_v, top_i = tokens.cpu(), logps.cpu(), lengths.cpu(), top_v.cpu(), top_i.cpu()
        stopped = done.cpu()
        results: list[list[Completion]] = []
        for i, p in enumerate(prompt_ids):
            group = []
            for s_idx in range(n):
                r = i * n + s_idx
                L = int(lengths[r])
                ids = tokens[r, :L].tolist()
                text = tok.decode(ids, skip_special_tokens=True)
                if texts_done[r]:
                    cut = min((text.find(s) for s in sp.stop if s in text), default=len(text))
                    text = text[:cut]
                tops = [dict(zip(top_i[r, j].tolist(), top_v[r, j].tolist())) for j in range(L)] if k else None
                group.append(
                    Completion(
                        list(p), ids, text, logps[r, :L].tolist(), "stop" if bool(stopped[r]) else "length", tops
                    )
                )
            results.append(group)
        return results
