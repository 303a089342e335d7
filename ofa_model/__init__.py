"""ofa_model: OFA in plain PyTorch: model, vocabulary, generation, checkpoints, preprocessing, tasks.

The names below are loaded on first use (PEP 562), so `import ofa_model.errors` (which the data readers
need in every Ray read task) does not pull in torch and the model.
"""

import importlib

_EXPORTS = {
    "ofa_model.bundle": ("Bundle", "BundleLimits", "load_bundle", "save_bundle"),
    "ofa_model.checkpoint": ("import_checkpoint",),
    "ofa_model.architecture": ("ARCHITECTURES", "OFAConfig", "Regularization", "get_config"),
    "ofa_model.generation": ("Constraint", "GenerationConfig", "Hypothesis", "PrefixTrie", "generate",
                             "score_candidates"),
    "ofa_model.model": ("DecoderState", "EncoderOut", "OFAModel"),
    "ofa_model.vocab": ("BoxCodec", "Vocabulary"),
    "ofa_model.weights": ("CheckpointMismatchError",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'ofa_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
