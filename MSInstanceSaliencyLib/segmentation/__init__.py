"""Segmentation of a case: lesion instances, lesion-wise evaluation and the segment pipeline."""
