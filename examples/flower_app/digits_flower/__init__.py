"""A Flower app on scikit-learn digits, written as Flower's PyTorch quickstart is, plus two fedsqueeze lines."""
