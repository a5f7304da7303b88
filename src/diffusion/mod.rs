//! Noise schedules, prediction targets and samplers with diffusers' semantics.

pub mod edm;
pub mod families;
pub mod schedule;
pub mod scheduler;
pub mod ve;

pub use schedule::{BetaSchedule, NoiseSchedule, Objective, PredictionType};
