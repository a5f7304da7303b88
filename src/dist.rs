//! The ranks of a data-parallel job. Built with the `mpi` feature and started by an MPI launcher
//! (`mpirun -np N wgpu-diffusion train …`), every process is one rank of MPI's world; otherwise
//! the process is the only rank and every collective below is the identity.
//!
//! The gradient all-reduce is deterministic by construction: each rank owns one slice of a
//! bucket, receives that slice from every rank (`MPI_Alltoallv`), sums the copies in rank order
//! (0, 1, …, N − 1) and sends the sum back to all (`MPI_Allgatherv`). MPI_Allreduce's summation
//! order is the library's choice and may change with the message size or the process layout;
//! this one is fixed, so a job gives the same bits run after run for the same N, and for N = 2
//! the sum g₀ + g₁ is exactly what one process accumulating the same two micro-batches computes.

use std::fmt;

/// Environment variables that launchers set in every rank, holding the job's size: Open MPI's
/// mpirun (`OMPI_COMM_WORLD_SIZE`), MPICH's Hydra and PMI-2 launchers such as `srun --mpi=pmi2`
/// (`PMI_SIZE`), and PMIx launchers that export `PMIX_SIZE`. Only a build without the `mpi`
/// feature relies on them (to refuse running as N copies); with the feature, MPI itself says.
const LAUNCHER_SIZE_VARS: &[&str] = &["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"];

/// Largest element count one MPI call moves (counts are C ints).
#[cfg(feature = "mpi")]
const MAX_MPI_COUNT: usize = (i32::MAX as usize) / 2;

/// The job size the launcher announced in the environment, if any.
pub fn launcher_world_size() -> Option<usize> {
    LAUNCHER_SIZE_VARS
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

/// What went wrong setting up or running the job's communication.
#[derive(Debug)]
pub struct DistError(String);

impl fmt::Display for DistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DistError {}

/// This process's place in the job, and (with the `mpi` feature, under a launcher) MPI's world.
pub struct World {
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    #[cfg(feature = "mpi")]
    mpi: Option<mpi_world::MpiWorld>,
}

impl World {
    /// One process, one rank: what every command but a launched `train`/`bench` uses.
    pub fn single() -> World {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            local_size: 1,
            #[cfg(feature = "mpi")]
            mpi: None,
        }
    }

    /// With the `mpi` feature, MPI's world (one rank when no launcher started the process: MPI's
    /// singleton start). Without it, one rank; started by a launcher as one of N > 1 processes
    /// it is an error, since N processes would each train alone and write the same run folder.
    pub fn from_environment() -> Result<World, DistError> {
        #[cfg(feature = "mpi")]
        {
            mpi_world::MpiWorld::init()
        }
        #[cfg(not(feature = "mpi"))]
        {
            let announced = launcher_world_size().unwrap_or(1);
            if announced > 1 {
                return Err(DistError(format!(
                    "started by an MPI launcher as one of {announced} processes, but this binary was built without MPI: rebuild with `cargo build --release --features mpi` (needs Open MPI and libclang; see the README's \"Several GPUs and hosts\")"
                )));
            }
            Ok(World::single())
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// The rank among the processes of this host (which adapter it takes).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    pub fn local_size(&self) -> usize {
        self.local_size
    }

    /// Rank 0 writes the run folder, checkpoints, samples and metrics.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Whether collectives do anything (more than one rank).
    pub fn is_parallel(&self) -> bool {
        self.size > 1
    }

    /// Overwrites `data` on every rank with rank 0's copy.
    pub fn broadcast_f32(&self, data: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            for chunk in data.chunks_mut(MAX_MPI_COUNT) {
                m.broadcast(chunk);
            }
        }
        let _ = data;
    }

    /// Overwrites `words` on every rank with rank 0's values.
    pub fn broadcast_u64(&self, words: &mut [u64]) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            m.broadcast(words);
        }
        let _ = words;
    }

    /// Replaces `data` on every rank by the element-wise sum over ranks, added in rank order
    /// (see the module's header): the same bits on every rank and in every run.
    pub fn sum_in_rank_order(&self, data: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            for chunk in data.chunks_mut(MAX_MPI_COUNT) {
                m.sum_in_rank_order(chunk);
            }
        }
        let _ = data;
    }

    /// `bytes` of rank 0 on every rank (any length).
    pub fn broadcast_bytes(&self, bytes: Vec<u8>) -> Vec<u8> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            let mut len = [bytes.len() as u64];
            m.broadcast(&mut len);
            let mut buf = bytes;
            buf.resize(len[0] as usize, 0);
            for chunk in buf.chunks_mut(MAX_MPI_COUNT) {
                m.broadcast(chunk);
            }
            return buf;
        }
        bytes
    }

    /// `value` of every rank, in rank order.
    pub fn gather_u64(&self, value: u64) -> Vec<u64> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            return m.all_gather(value);
        }
        vec![value]
    }

    /// Ends the process with `code`; with several ranks, MPI_Abort ends every rank of the job
    /// (a rank that stops alone would leave the others waiting in a collective).
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            m.abort(code);
        }
        std::process::exit(code)
    }

    /// Prints `message` as this rank's error and ends the job ([`World::abort`], code 1).
    pub fn abort_with(&self, message: &str) -> ! {
        eprintln!("error (rank {} of {}): {message}", self.rank, self.size);
        self.abort(1)
    }

    /// Waits until every rank arrives.
    pub fn barrier(&self) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            m.barrier();
        }
    }
}

/// Splits `len` elements into `parts` contiguous slices, as even as possible: (offset, count).
pub fn slices(len: usize, parts: usize) -> Vec<(usize, usize)> {
    let parts = parts.max(1);
    let (base, extra) = (len / parts, len % parts);
    let mut offset = 0;
    (0..parts)
        .map(|p| {
            let count = base + usize::from(p < extra);
            let s = (offset, count);
            offset += count;
            s
        })
        .collect()
}

/// FNV-1a over the bits of `values`: the cheap fingerprint ranks compare to catch divergence.
pub fn fingerprint(values: &[f32]) -> u64 {
    values.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
        (h ^ u64::from(v.to_bits())).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// FNV-1a over bytes (options compared across ranks).
pub fn fingerprint_bytes(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The ranks whose fingerprint (one per rank, in rank order) differs from rank 0's.
pub fn ranks_differing_from_root(fingerprints: &[u64]) -> Vec<usize> {
    (1..fingerprints.len())
        .filter(|&r| fingerprints[r] != fingerprints[0])
        .collect()
}

#[cfg(feature = "mpi")]
mod mpi_world {
    use mpi::datatype::{Partition, PartitionMut};
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    use super::{DistError, World, slices};

    /// MPI's world communicator and the universe that finalizes MPI when dropped.
    pub struct MpiWorld {
        // Dropped before the universe, whose drop calls MPI_Finalize.
        world: SimpleCommunicator,
        _universe: mpi::environment::Universe,
    }

    impl MpiWorld {
        /// Initializes MPI (all MPI calls come from the thread that owns the `World`) and
        /// finds this rank's place on its host with `MPI_Comm_split_type(SHARED)`.
        pub fn init() -> Result<World, DistError> {
            let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)
                .ok_or_else(|| DistError("MPI was already initialized in this process".into()))?;
            let world = universe.world();
            let shared = world.split_shared(world.rank());
            let (rank, size) = (world.rank() as usize, world.size() as usize);
            let (local_rank, local_size) = (shared.rank() as usize, shared.size() as usize);
            if size > 1 {
                // A panic must end the job: unwinding would reach MPI_Finalize, which waits for
                // ranks that are themselves waiting in a collective for this one. An aborted
                // process makes the launcher end every rank.
                let report = std::panic::take_hook();
                std::panic::set_hook(Box::new(move |info| {
                    report(info);
                    eprintln!("rank {rank} of {size} panicked: ending the job");
                    std::process::abort();
                }));
            }
            Ok(World {
                rank,
                size,
                local_rank,
                local_size,
                mpi: Some(MpiWorld {
                    world,
                    _universe: universe,
                }),
            })
        }

        pub fn broadcast<T: Equivalence>(&self, data: &mut [T]) {
            self.world.process_at_rank(0).broadcast_into(data);
        }

        pub fn barrier(&self) {
            self.world.barrier();
        }

        pub fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }

        pub fn all_gather(&self, value: u64) -> Vec<u64> {
            let mut all = vec![0u64; self.world.size() as usize];
            self.world.all_gather_into(&value, &mut all[..]);
            all
        }

        /// Reduce-scatter by `MPI_Alltoallv` (rank j receives slice j from every rank, summed
        /// in rank order), then `MPI_Allgatherv` of the sums.
        pub fn sum_in_rank_order(&self, data: &mut [f32]) {
            let n = self.world.size() as usize;
            let me = self.world.rank() as usize;
            let owned = slices(data.len(), n);
            let (mine_at, mine) = owned[me];
            let counts: Vec<i32> = owned.iter().map(|&(_, c)| c as i32).collect();
            let displs: Vec<i32> = owned.iter().map(|&(o, _)| o as i32).collect();
            // What this rank receives: its slice from each rank, one after another in rank order.
            let recv_counts = vec![mine as i32; n];
            let recv_displs: Vec<i32> = (0..n).map(|r| (r * mine) as i32).collect();
            let mut copies = vec![0f32; mine * n];
            {
                let send = Partition::new(&*data, &counts[..], &displs[..]);
                let mut recv =
                    PartitionMut::new(&mut copies[..], &recv_counts[..], &recv_displs[..]);
                self.world.all_to_all_varcount_into(&send, &mut recv);
            }
            let sum = &mut data[mine_at..mine_at + mine];
            sum.copy_from_slice(&copies[..mine]);
            for r in 1..n {
                for (s, c) in sum.iter_mut().zip(&copies[r * mine..(r + 1) * mine]) {
                    *s += *c;
                }
            }
            let reduced = sum.to_vec();
            let mut recv = PartitionMut::new(&mut *data, &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(&reduced[..], &mut recv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_buffer_evenly() {
        assert_eq!(slices(10, 3), vec![(0, 4), (4, 3), (7, 3)]);
        assert_eq!(slices(2, 4), vec![(0, 1), (1, 1), (2, 0), (2, 0)]);
        let s = slices(1_000_003, 7);
        assert_eq!(s.iter().map(|x| x.1).sum::<usize>(), 1_000_003);
    }

    #[test]
    fn one_rank_collectives_are_the_identity() {
        let w = World::single();
        let mut v = vec![1.5f32, -2.0, 3.25];
        w.sum_in_rank_order(&mut v);
        w.broadcast_f32(&mut v);
        assert_eq!(v, vec![1.5, -2.0, 3.25]);
        assert_eq!(w.gather_u64(7), vec![7]);
        assert!(w.is_root() && !w.is_parallel());
    }

    #[test]
    fn diverged_ranks_are_named() {
        assert!(ranks_differing_from_root(&[5, 5, 5]).is_empty());
        assert_eq!(ranks_differing_from_root(&[5, 6, 5, 7]), vec![1, 3]);
        assert!(ranks_differing_from_root(&[9]).is_empty());
    }

    #[test]
    fn fingerprint_sees_one_bit() {
        let a = [1.0f32, 2.0, 3.0];
        let mut b = a;
        b[1] = f32::from_bits(b[1].to_bits() ^ 1);
        assert_ne!(fingerprint(&a), fingerprint(&b));
    }
}
