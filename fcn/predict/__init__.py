"""A trained model on whole images: the Predictor, and the evaluate and export stages' work."""
