"""A lean training step for frozen backbones: keep for backward only what the wanted gradients need.

Autograd saves, for every op, what *any* of its gradients could use. In a frozen backbone that wastes
most of the memory: a frozen conv still keeps its input (for a weight gradient nobody asked for), an
eval-mode BatchNorm keeps its input, a ReLU its fp32 output. TT-LoRA's `W + Delta W` forward is worse:
it makes every conv weight require grad, so each step also computes the dense weight gradient and only
then contracts it into G1.

`lean_training(model)` is a context manager. Inside it, eligible modules run through custom autograd
Functions that save what their *input* gradient and their *trainable* parameters need:

- a frozen Conv1d/Conv2d (every padding mode, stride, dilation, groups; its bias may train): nothing
  but its weight, which is a parameter anyway;
- an eval-mode BatchNorm1d/2d whose scale is frozen (its shift may train): nothing. Its backward is
  aten's own BatchNorm backward (after a frozen conv), or, after a TT-LoRA conv, its scale s folded into
  that conv's weight (a weight-size product, not an activation pass);
- ReLU / ReLU6: a bool mask instead of the fp32 output (1 byte instead of 4 per element), or the output
  itself when the next layer keeps it anyway;
- `TTLoRAConv`: the frozen cores G2.. are contracted once into K (r x C_in/groups x k...). Next to the
  main conv the layer produces the side output u = conv(x, K) (r channels, per group for grouped convs,
  since Delta W's row o only sees o's group) and saves only u; G1's gradient is s * sum g u^T, a batched
  matmul, and the input gradient one convolution_backward asked for the input gradient alone, through
  (W + G1 K) s. No dense weight gradient is formed. Where u would be larger than the input (depthwise,
  some grouped convs), the input is saved instead and G1's gradient is the (cheap) weight gradient
  contracted with K: whichever keeps fewer bytes.

A conv, its eval BatchNorm and its activation inside an nn.Sequential (or a subclass keeping
Sequential's forward) run as one autograd node.

The forward runs the plain path's own ops on the same tensors (the conv with W + Delta W formed as
TTLoRAConv forms it, F.batch_norm in eval mode, the same clamp), so the output is the plain path's bit for
bit. The backward of frozen convs and BatchNorms runs the ops autograd's own nodes run (convolution_backward
and native_batch_norm_backward, given shape-only stand-ins for the activations they do not read), so on the
CPU in fp32 the methods that train around frozen layers (lora, dora, adapter, bias, bn, head, galore) get
the plain path's gradients bit for bit; TT-LoRA's G1 gradient is a different contraction of the same sum
and equals it to float rounding. That matters beyond tidiness: few-shot Adam runs from a zero-initialised
update amplify rounding differences into different final F1 (docs/benchmarks.md).

Nothing about the model changes: `forward` is overridden per instance and restored on exit, so the
module tree, parameters, buffers and state dict are the ones fusion and export see. Anything not
recognised runs as it is; so does everything under no_grad or when no gradient is needed. Do not
deepcopy or pickle a model while inside the context (the overrides are closures).
"""


from .functions import LeanActivation, LeanLayer, bn_scale, contracted_cores  # noqa: F401
from .plan import LeanPlan, lean_training, plan_lean  # noqa: F401

__all__ = ["LeanActivation", "LeanLayer", "LeanPlan", "bn_scale", "contracted_cores", "lean_training", "plan_lean"]
