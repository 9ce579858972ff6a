"""Interchange with the original PyTorch SSAST: its `.pth` checkpoint layout, both ways."""
