"""The Cityscapes dataset's own conventions: labels, file layout, annotations, official scores.

Everything here must agree with cityscapesScripts exactly; tests compare against it.
"""
