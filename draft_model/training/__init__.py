"""Training and evaluation of drafts: data, features, the training loop, offline
acceptance. Its dependencies are the [train] extra; the server never imports it."""
