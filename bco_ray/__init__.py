"""bco-ray: align LLMs from thumbs-up / thumbs-down feedback with BCO, on Ray."""

__version__ = "0.1.0"
