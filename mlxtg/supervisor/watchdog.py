"""Is a resident worker hung? A pure verdict from its last heartbeat, testable alone.

Two ways a worker stops serving without exiting:
- it is silent: no heartbeat for `heartbeat_timeout` (SIGSTOP, a deadlock that holds the
  I/O thread, a machine that swaps it out);
- its engine is stalled: the I/O thread still beats, but the step it reports has been
  running for `stall_timeout` (a forward pass or a kernel that never returns). A step is
  bounded by one prefill chunk, so the limit only needs to exceed the longest chunk.
"""

from __future__ import annotations

from typing import Any


def hung_reason(
    silent_s: float, stats: dict[str, Any], heartbeat_timeout: float, stall_timeout: float
) -> str | None:
    """Why the worker counts as hung, or None. `silent_s`: seconds since its last heartbeat;
    `stats`: that heartbeat's stats (`step_age_s` is the running step's age then)."""
    if silent_s > heartbeat_timeout:
        return f"no heartbeat for {silent_s:.1f}s (limit {heartbeat_timeout:g}s)"
    step_age = float(stats.get("step_age_s") or 0.0)
    if step_age > 0 and step_age + silent_s > stall_timeout:
        return (
            f"one engine step has run for {step_age + silent_s:.1f}s "
            f"(limit {stall_timeout:g}s, --stall-timeout)"
        )
    return None
