// group_norm: to be written
