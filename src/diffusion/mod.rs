//! Noise schedules, prediction targets and samplers with diffusers' semantics.

pub mod edm;
pub mod families;
pub mod schedule;
pub mod scheduler;

pub use schedule::{BetaSchedule, NoiseSchedule, Objective, PredictionType};
