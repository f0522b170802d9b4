"""CogAgent (cogagent-chat-hf, cogagent-vqa-hf): CogVLM1 plus a high-resolution cross-attention branch."""
