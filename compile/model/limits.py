"""Limits every backend applies the same way to what it is asked to compile."""

import logging

from lmi_compile.errors import BadInput

log = logging.getLogger("lmi_compile")


def sequence_problem(config, dims, seq_len: int, *, allow_longer: bool, flag: str) -> tuple[str, str] | None:
    """("error" | "warning", message) when `seq_len` exceeds the model's max_position_embeddings, else None.

    Longer sequences are refused unless the user asks (--allow-longer) and config.json carries rope
    scaling that can stretch the positions; then it is a warning, since quality past the trained
    length is the user's call."""
    limit = dims.max_position_embeddings
    if seq_len <= limit:
        return None
    what = f"{flag} {seq_len} exceeds max_position_embeddings {limit}"
    if allow_longer and config.rope_scaling:
        kind = config.rope_scaling.get("rope_type") or config.rope_scaling.get("type")
        factor = config.rope_scaling.get("factor")
        if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 0:
            # the positions the scaling stretches to: factor times the trained length (llama3 and yarn name it
            # original_max_position_embeddings; linear and dynamic scale max_position_embeddings)
            base = config.rope_scaling.get("original_max_position_embeddings") or limit
            covered = max(limit, int(factor * base))
            if seq_len > covered:
                return "error", (f"{config.path}: {what}, and its {kind} rope scaling (factor {factor}) covers "
                                 f"{covered}; lower it to at most {covered}")
        return "warning", f"{config.path}: {what}; allowed by --allow-longer with {kind} rope scaling"
    why = ("--allow-longer needs rope scaling in config.json to cover it" if allow_longer else
           "lower it, or pass --allow-longer if the model's rope scaling covers it")
    return "error", f"{config.path}: {what}; {why}"


def check_sequence_length(config, dims, seq_len: int, *, allow_longer: bool, flag: str) -> None:
    """Refuse (BadInput) or warn, as `sequence_problem` says."""
    problem = sequence_problem(config, dims, seq_len, allow_longer=allow_longer, flag=flag)
    if problem and problem[0] == "error":
        raise BadInput(problem[1])
    if problem:
        log.warning(problem[1])
