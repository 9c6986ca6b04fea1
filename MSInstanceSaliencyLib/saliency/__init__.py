"""Saliency maps: SmoothGrad, Grad-CAM++, the context box, explain (one lesion, end to end) and figures."""
