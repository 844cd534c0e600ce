"""The C&C transform: Tucker-2 decomposition, singular-value clipping, rank pruning."""
from cc_core.compact.clip import NORMALIZERS, clip_matrix, clip_tucker2, normalizer_value
from cc_core.compact.layers import SVDConv2d, Tucker2Conv2d, apply_structure, model_structure
from cc_core.compact.plan import CompactionPlan, LayerPlan
from cc_core.compact.ranks import allocate_ranks
from cc_core.compact.transform import CompactConfig, clean_compact
from cc_core.compact.tucker import Tucker2, hooi_tucker2, hosvd_tucker2, matrix_svd

__all__ = ["NORMALIZERS", "CompactConfig", "CompactionPlan", "LayerPlan", "SVDConv2d",
           "Tucker2", "Tucker2Conv2d", "allocate_ranks", "apply_structure", "clean_compact",
           "clip_matrix", "clip_tucker2", "hooi_tucker2", "hosvd_tucker2", "matrix_svd",
           "model_structure", "normalizer_value"]
