"""The masks stage: polygon annotations → labelIds, labelTrainIds, color and instanceIds PNGs,
pixel-identical to cityscapesScripts, and their agreement with masks shipped with the data."""
