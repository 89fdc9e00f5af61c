"""`--precision POLICY` of the CLIs and the Whisper Python API -> the EP's provider options.

POLICY is a mode (`bf16`, `int8`, `bf16x3`: the `precision` option), a named policy below, or `precision_policy`
rules (`MODE:SELECTOR[,SELECTOR...];...`, README "Precision modes"). The EP parses the rules; this module only
routes them, and checks them as the EP will (so that a typo is an error before three sessions are created,
never a silent CPU EP fallback).
"""

from __future__ import annotations

MODES = ("bf16", "int8", "bf16x3")
# Whisper-oriented named policies; rules as the EP reads them (first match wins, unmatched nodes: bf16).
NAMED = {
    # int8 for every constant weight except the logits projection (53 MB of the decoder's 96 MB, and the
    # product whose error decides the next token); attention (run-time B) stays bf16 in any case.
    "mixed": "bf16:name=*proj_out*;int8:weight=constant",
    # as mixed, and the encoder's two Convs (the product right behind the log-mel input) in bf16 too
    "mixed-conv": "bf16:name=*proj_out*;bf16:op=Conv;int8:weight=constant",
}
# The default of --precision (xdna transcribe, serve, batch): the fastest policy within 0.5 WER points of fp32 on
# the real-speech set, measured (benchmarks/whisper.py --section precision; benchmarks/README.md "Precision
# policies"): int8, same WER as fp32 and the least CPU time. The Python API's precision=None keeps the EP's bf16.
DEFAULT = "int8"


def provider_options(policy: str | None) -> dict[str, str]:
    """The XDNA EP's provider options for `policy` (None or "": none, i.e. the EP's bf16 default).
    Raises ValueError naming what is wrong."""
    policy = (policy or "").strip()
    if not policy:
        return {}
    if policy in MODES:
        return {"precision": policy}
    rules = NAMED.get(policy, policy)
    if ":" not in rules:
        raise ValueError(f"bad precision policy {policy!r} (accepted: {', '.join(MODES + tuple(NAMED))}, or rules "
                         "MODE:SELECTOR[,SELECTOR...];... such as 'bf16:name=*proj_out*;int8:weight=constant')")
    from . import _native

    _native.precision_policy("bf16", rules)  # ValueError naming the bad rule, as the EP would say it
    return {"precision_policy": rules}


def describe(policy: str | None) -> str:
    """One line for logs: the policy and, for a named one, its rules."""
    policy = (policy or "").strip() or "bf16"
    return f"{policy} ({NAMED[policy]})" if policy in NAMED else policy
