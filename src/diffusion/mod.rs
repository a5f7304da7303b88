//! Noise schedules, prediction targets and samplers with diffusers' semantics.

pub mod sampler;
pub mod schedule;

pub use schedule::{BetaSchedule, NoiseSchedule, PredictionType};
