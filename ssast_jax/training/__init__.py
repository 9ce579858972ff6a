"""The training loop: the jitted step (`step`), its state, sharding, checkpoints, learning-rate
schedule, logs and the run itself (`train.train_and_evaluate`)."""
