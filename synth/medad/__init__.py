"""MedAD: multi-center medical anomaly VQA on real base images with synthetic lesions."""
