use super::*;

fn p(start: u64, end: u64, kind: Kind) -> Piece {
    Piece { start, end, kind }
}

#[test]
fn base_data_turns_pieces_into_comparisons() {
    let pieces = [p(0, 100, Kind::Data), p(100, 300, Kind::Zero)];
    let base = [(0, 50, false), (50, 150, true), (150, 400, false)];
    let out: Vec<(u64, u64, Kind)> = overlay_base(&pieces, &base).iter().map(|q| (q.start, q.end, q.kind)).collect();
    assert_eq!(
        out,
        vec![
            (0, 50, Kind::Data),
            (50, 100, Kind::Cmp { src_data: true }),
            (100, 150, Kind::Cmp { src_data: false }),
            (150, 300, Kind::Zero),
        ]
    );
}

#[test]
fn units_only_where_data_is() {
    let mib = 1 << 20;
    let pieces =
        [p(0, 3 * mib, Kind::Zero), p(3 * mib, 3 * mib + 10, Kind::Data), p(3 * mib + 10, 1 << 40, Kind::Zero)];
    let items = work_items(&pieces, mib, ZeroMode::Skip);
    assert_eq!(items.len(), 1);
    assert!(matches!(items[0], Item::Unit { start, end } if start == 3 * mib && end == 4 * mib));
    // With -n the zeros around are explicit, once each, outside the unit.
    let items = work_items(&pieces, mib, ZeroMode::Explicit);
    let spans: Vec<(u64, u64, bool)> = items
        .iter()
        .map(|i| match *i {
            Item::Unit { start, end } => (start, end, true),
            Item::Zero { start, end } | Item::Fill { start, end } => (start, end, false),
        })
        .collect();
    assert_eq!(spans, vec![(0, 3 * mib, false), (3 * mib, 4 * mib, true), (4 * mib, 1 << 40, false)]);
}

#[test]
fn zero_runs_shorter_than_sparse_size_are_written() {
    let pieces = [p(0, 8 * 4096, Kind::Data)];
    let shared = Shared {
        sources: &[],
        base: None,
        pieces: &pieces,
        block: 4096,
        sparse: 3 * 4096,
        zeros: ZeroMode::Skip,
        compress: None,
        pool: std::sync::Mutex::default(),
    };
    let mut buf = vec![1u8; 8 * 4096];
    buf[4096..3 * 4096].fill(0); // a 2-block run: written
    buf[4 * 4096..7 * 4096].fill(0); // a 3-block run: skipped
    let ops = shared.decide(0, &buf, None);
    let spans: Vec<(u64, usize)> = ops
        .iter()
        .map(|o| match o {
            Op::Data { off, len, .. } => (*off, *len),
            _ => panic!("only data"),
        })
        .collect();
    assert_eq!(spans, vec![(0, 4 * 4096), (7 * 4096, 4096)]);
}
