"""HH-RLHF dialogues ("\n\nHuman: ... \n\nAssistant: ..."): split into prompt and response(s). Used by the data
loaders (``data.py``) and the built-in multi-user sets (``userdata.py``)."""

from __future__ import annotations

HH_ASSISTANT = "\n\nAssistant:"


def split_hh_pair(chosen: str, rejected: str | None) -> tuple[str, str, str | None]:
    """Split an HH-RLHF (chosen, rejected) pair at the last '\\n\\nAssistant:' of their shared beginning (as
    TRL's extract_prompt does), so a response that itself contains another turn stays whole."""
    if rejected is None:
        prompt, response = split_hh(chosen)
        return prompt, response, None
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    split_hh(chosen), split_hh(rejected)  # each must be a dialogue
    try:
        prompt, _ = split_hh(chosen[:n] + "\x00")  # the cut must lie inside the shared prefix
    except ValueError:
        raise ValueError("chosen and rejected dialogues have different prompts") from None
    cut = len(prompt)
    return prompt, chosen[cut:].lstrip(" "), rejected[cut:].lstrip(" ")


def split_hh(text: str) -> tuple[str, str]:
    """An HH-RLHF dialogue -> (prompt up to and including the last '\\n\\nAssistant:', final response)."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:].lstrip(" ")
