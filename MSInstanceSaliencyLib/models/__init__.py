"""Models: the spec and LoadedModel (base), one module per format (monai = model.json folders, nnunet, lstai),
format detection (formats), load_model (loading), the pre-processing the formats define, grids, the sliding window
and the device."""
