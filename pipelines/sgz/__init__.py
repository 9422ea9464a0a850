"""SGZ (Zheng & Gupta, WACV 2022 workshops): zero-shot curve estimation with a semantic-guided loss."""
