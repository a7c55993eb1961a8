"""Per-kind knowledge: one module per kind of layer that needs more than a per-channel mask.

Each module says how to recognise its kind, how to mask it (soft / hard), how to slice it
(the sliced hard pass) and what it costs (resource rows):

* :mod:`.grouped`: grouped convolutions that are not depthwise (ResNeXt, RegNet);
* :mod:`.norms`: LayerNorm and GroupNorm over a pruned channel dimension (ConvNeXt,
  PoolFormer, a transformer's embedding width);
* :mod:`.hf_attention`: Hugging Face ViT / DeiT self-attention heads;
* :mod:`.mha`: ``nn.MultiheadAttention`` heads (torchvision ViT).

timm's attention heads live in :mod:`s2hpruner.core.attention`. Plain conv / linear /
BatchNorm channels need nothing here.
"""
