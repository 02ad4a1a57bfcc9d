"""EchoAtt (attend, copy, then adjust): measure which layers of a teacher attend alike, group them, and convert a
copy of the teacher into a student whose sharing layers re-use their anchor's attention (docs/shared_attention.md).

    from kdkernels.echoatt import layer_similarity, plan_groups, plot_similarity, convert_to_echoatt
    S = layer_similarity(teacher, input_ids, attention_mask)      # (L, L), streamed, no T x T map stored
    groups = plan_groups(S, n_shared=9)
    plot_similarity(S, "similarity.png", groups=groups)
    student = convert_to_echoatt(teacher, groups)                 # then distill with kdkernels' losses

The kernels: kdkernels.attention (with LSE), kdkernels.shared_attention, kdkernels.shared_attention_probs.
`transformers` is optional (pip install 'kdkernels[hf]'); nothing here imports it.
"""
from ..functional import attention_similarity
from .analysis import collect_qk, format_similarity, layer_similarity, plan_groups, plot_similarity
from .modeling import (EchoAttention, EchoGroup, apply_rope, check_groups, convert_to_echoatt, find_decoder_layers,
                       hf_attention_mask, removed_parameters)

__all__ = ["attention_similarity", "collect_qk", "layer_similarity", "plan_groups", "plot_similarity",
           "format_similarity", "EchoAttention", "EchoGroup", "convert_to_echoatt", "removed_parameters",
           "find_decoder_layers", "check_groups", "apply_rope", "hf_attention_mask"]
