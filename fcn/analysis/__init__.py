"""Where and how sure a model is wrong: boundary quality, calibration, per-image analysis.

    boundary     Boundary IoU (Cheng et al. 2021) and trimap IoU by distance from an edge
    calibration  expected calibration error, reliability diagram, temperature scaling,
                 confidence and entropy maps
    per_image    per-image rows (accuracy, mIoU over present classes, confusions), city means
    gallery      the worst-k gallery: image | truth | prediction | errors | confidence
    evaluation   every per-image accumulator fed together, as the val images stream past
"""
