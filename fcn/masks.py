"""Polygons → label masks, drawn exactly as cityscapesScripts draws them."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from fcn.annotations import Annotation
from fcn.labels import label_for_polygon


def draw_label_ids(annotation: Annotation) -> np.ndarray:
    """uint8[H, W] labelIds: objects in file order, deleted and negative-id objects skipped."""
    image = Image.new("L", (annotation.width, annotation.height), 0)
    drawer = ImageDraw.Draw(image)
    for obj in annotation.objects:
        label = label_for_polygon(obj.label)
        if obj.deleted or label is None or label.id < 0:
            continue
        drawer.polygon(obj.polygon, fill=label.id)
    return np.asarray(image)
