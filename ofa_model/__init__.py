"""ofa_model: OFA in plain PyTorch: model, vocabulary, generation, checkpoints, preprocessing, tasks."""

from ofa_model.checkpoint import Bundle, CheckpointMismatchError, import_checkpoint, load_bundle, save_bundle
from ofa_model.config import ARCHITECTURES, OFAConfig, Regularization, get_config
from ofa_model.generation import (
    Constraint,
    GenerationConfig,
    Hypothesis,
    PrefixTrie,
    generate,
    score_candidates,
)
from ofa_model.model import DecoderState, EncoderOut, OFAModel
from ofa_model.vocab import BoxCodec, Vocabulary

__all__ = [
    "ARCHITECTURES", "Bundle", "BoxCodec", "CheckpointMismatchError", "Constraint", "DecoderState", "EncoderOut",
    "GenerationConfig", "Hypothesis", "OFAConfig", "OFAModel", "PrefixTrie", "Regularization", "Vocabulary",
    "generate", "get_config", "import_checkpoint", "load_bundle", "save_bundle", "score_candidates",
]
