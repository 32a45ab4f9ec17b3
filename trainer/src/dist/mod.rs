pub mod launch;
pub mod rendezvous;
