// conv2d_subgroup: to be written
