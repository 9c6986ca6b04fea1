"""The TP/FP classifier: radiomic features of saliency maps, the classifier and its feature tables."""
