"""bert-mpq application: tasks, data, metrics, the training loop and the search stages."""
