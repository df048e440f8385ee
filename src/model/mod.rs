//! Transformer models: configuration, weights, forward and activation-only backward.
