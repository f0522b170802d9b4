"""CogVLM2-Video family (`cogvlm2-video-llama3-chat`, `-base`, `cogvlm2-llama3-caption`): CogVLM2 without vision
experts, fed 224-px video frames (docs/architecture.md §21)."""
