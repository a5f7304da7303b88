// timestep_embedding: to be written
