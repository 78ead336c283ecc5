"""The errors zsfw raises for predictable failures: one base class, one subclass per area.

Every message names the thing, the bad value and what would be right, in one line. The CLI
prints a ``ZsfwError`` as ``zsfw: error: …`` and exits 2; anything else is a bug and keeps its
traceback. Library callers can catch ``ZsfwError`` alone. Subclasses that used to be
``ValueError``\\ s still are, so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations


class ZsfwError(Exception):
    """Base of every predictable zsfw failure."""


class RecipeError(ZsfwError, ValueError):
    """A recipe is malformed; the message names the source and the offending key."""


class PluginError(ZsfwError):
    """A plugin is missing, broken, clashes with another, or rejects its options."""


class TargetError(ZsfwError, ValueError):
    """Targets match nothing, or match something that cannot be factorized."""


class ModelLoadError(ZsfwError, ValueError):
    """The model cannot be found or is not a supported causal LM."""


class CalibrationError(ZsfwError, ValueError):
    """The calibration data is unreadable, too small, or does not drive the targets."""


class NonFiniteError(ZsfwError, FloatingPointError):
    """NaN or Inf in weights, activations, gradients or the loss; names where it appeared."""


class DeviceError(ZsfwError, RuntimeError):
    """The processes cannot reach each other across their devices (the NCCL or gloo process group)."""


class AllocationError(ZsfwError, ValueError):
    """The byte budget cannot be met, or an allocator returned an invalid plan."""


class CheckpointError(ZsfwError):
    """A saved compressed model cannot be written or read back as its config describes it."""


class DestinationError(ZsfwError):
    """The output folder cannot be written, or is refused so that nothing of the user's is lost."""


class SourceError(ZsfwError, RuntimeError):
    """An embedded model or text cannot be fetched from PyPI or extracted."""


class EvaluationError(ZsfwError, ValueError):
    """An evaluation was asked for something it cannot measure."""


class ServingError(ZsfwError, ValueError):
    """Generation or export was given inputs or settings they cannot take."""


def one_of(option: str, value: str, allowed: tuple[str, ...] | list[str]) -> str:
    """``value`` when it is one of ``allowed``, else a one-line ``ValueError`` naming ``option``
    (a component's constructor raises it; plugin creation reports it as the component's)."""
    if value not in allowed:
        raise ValueError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")
    return value
