"""What is computed from masks alone, below evaluation, training and predict: confusion counts and severity."""
