"""MSInstanceSaliencyLib: instance-level saliency for MS lesion segmentation (no Slicer imports)."""

__version__ = "0.1.0"
