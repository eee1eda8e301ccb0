"""storygptv: StoryGPT-V (arXiv 2312.02252) for Hugging Face diffusers and transformers."""

__version__ = "0.1.0.dev0"
