// reduce: to be written
