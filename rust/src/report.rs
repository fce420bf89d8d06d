//! What a check finds: [`CheckReport`] (the counters of `qemu-img check --output=json`), and
//! the structured list of [`Problem`]s qcowrs adds.

/// At most this many problems are listed one by one; the rest are counted.
pub const MAX_LISTED_PROBLEMS: usize = 10_000;

/// One problem found by a check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Short machine-readable kind ("leak", "refcount-too-low", "cross-link", ...).
    pub kind: &'static str,
    /// Host offset concerned, if any.
    pub host_offset: Option<u64>,
    /// Guest offset concerned, if known.
    pub guest_offset: Option<u64>,
    /// Human-readable description.
    pub message: String,
    /// The line `qemu-img check` prints for the same finding, where it has one.
    pub qemu: Option<String>,
}

/// The problems found by a check: the first [`MAX_LISTED_PROBLEMS`] listed, the rest counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProblemLog {
    /// The listed problems.
    pub list: Vec<Problem>,
    /// Problems found but not listed.
    pub unlisted: u64,
}

impl ProblemLog {
    /// Records a problem.
    pub fn push(&mut self, kind: &'static str, host_offset: Option<u64>, guest_offset: Option<u64>, message: String) {
        if self.list.len() < MAX_LISTED_PROBLEMS {
            self.list.push(Problem { kind, host_offset, guest_offset, message, qemu: None });
        } else {
            self.unlisted += 1;
        }
    }

    /// Records a problem with the line `qemu-img check` prints for it.
    pub fn push_qemu(
        &mut self,
        kind: &'static str,
        host_offset: Option<u64>,
        guest_offset: Option<u64>,
        message: impl FnOnce() -> String,
        qemu: impl FnOnce() -> String,
    ) {
        if self.list.len() < MAX_LISTED_PROBLEMS {
            self.list.push(Problem { kind, host_offset, guest_offset, message: message(), qemu: Some(qemu()) });
        } else {
            self.unlisted += 1;
        }
    }

    /// Records a problem whose message is made only if it will be listed (hot paths: a
    /// hostile image can have hundreds of millions of problems).
    pub fn push_with(
        &mut self,
        kind: &'static str,
        host_offset: Option<u64>,
        guest_offset: Option<u64>,
        message: impl FnOnce() -> String,
    ) {
        if self.list.len() < MAX_LISTED_PROBLEMS {
            self.list.push(Problem { kind, host_offset, guest_offset, message: message(), qemu: None });
        } else {
            self.unlisted += 1;
        }
    }

    /// Appends another log (keeping the listing limit).
    pub fn extend(&mut self, other: ProblemLog) {
        for p in other.list {
            if self.list.len() < MAX_LISTED_PROBLEMS {
                self.list.push(p);
            } else {
                self.unlisted += 1;
            }
        }
        self.unlisted += other.unlisted;
    }
}

/// Counters of a check, named as `qemu-img check`'s.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Counts {
    pub check_errors: u64,
    pub corruptions: u64,
    pub leaks: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
}

/// The result of a check, mirroring `qemu-img check --output=json`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Counters with qemu-img's meaning.
    pub counts: Counts,
    /// (highest used cluster + 1) * cluster_size.
    pub image_end_offset: u64,
    /// What was found, one entry per problem (the first [`MAX_LISTED_PROBLEMS`]).
    pub problems: ProblemLog,
    /// The refcount structure was rebuilt.
    pub rebuilt: bool,
    /// What a repair dropped or changed beyond refcounts and OFLAG_COPIED (snapshots dropped,
    /// entries cleared, tables moved), one entry each.
    pub dropped: Vec<Problem>,
}

impl CheckReport {
    /// No check errors, corruptions or leaks.
    pub fn is_clean(&self) -> bool {
        self.counts.check_errors == 0 && self.counts.corruptions == 0 && self.counts.leaks == 0
    }

    /// `qemu-img check`'s exit code: 0 clean, 1 check failed, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.counts.check_errors > 0 {
            1
        } else if self.counts.corruptions > 0 {
            2
        } else if self.counts.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// The JSON fields as qemu-img names them; zero-valued ones omitted except `check-errors`.
    pub fn json_fields(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counts;
        let mut v = vec![("check-errors", c.check_errors)];
        for (k, x) in [
            ("image-end-offset", self.image_end_offset),
            ("corruptions", c.corruptions),
            ("leaks", c.leaks),
            ("corruptions-fixed", c.corruptions_fixed),
            ("leaks-fixed", c.leaks_fixed),
            ("total-clusters", c.total_clusters),
            ("allocated-clusters", c.allocated_clusters),
            ("fragmented-clusters", c.fragmented_clusters),
            ("compressed-clusters", c.compressed_clusters),
        ] {
            if x != 0 {
                v.push((k, x));
            }
        }
        v
    }
}
