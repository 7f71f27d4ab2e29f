//! The metric names storepulse-ingest records, in one place (each is recorded
//! where its comment says; `/metrics` renders them in the Prometheus
//! text format). Names follow `storepulse_<component>_<name>_<unit>`.

/// `storepulse_ingest_dead_letters_total` (counter), recorded in `dead_letter.rs`.
pub const INGEST_DEAD_LETTERS_TOTAL: &str = "storepulse_ingest_dead_letters_total";
/// `storepulse_ingest_line_amount_mismatches_total` (counter), recorded in `decode.rs`.
pub const INGEST_LINE_AMOUNT_MISMATCHES_TOTAL: &str =
    "storepulse_ingest_line_amount_mismatches_total";
