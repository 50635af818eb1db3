"""UltraPrompt (P-Aligner, arXiv 2508.04626): principle-guided MCTS over instruction rewrites."""
