//! The manager's pipelines, presets and configuration across the tiers, on generated
//! models and on the real model; each report is checked against the file's actual bytes
//! and snapshotted.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memory_tier::AttachMode;
use unified_manager::demo::{DemoShape, write_demo_model};
use unified_manager::{
    BoostOptions, ConfigDir, Manager, OptimizeOptions, PipelineReport, Preset, Repair,
    SafetyOptions, StepResult,
};

fn differing_bytes(a: &[u8], b: &[u8]) -> u64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).filter(|(x, y)| x != y).count() as u64
}

fn tensor_offset(path: &Path, name: &str) -> u64 {
    let map = byte_tier::MappedFile::open(path).unwrap();
    map.parse().unwrap().tensor(name).unwrap().data_offset
}

fn demo_model(dir: &Path) -> PathBuf {
    write_demo_model(dir, DemoShape::default()).unwrap()
}

/// Plants a NaN and an infinity in F32 tensors and a NaN block scale in a Q8_0 tensor.
fn plant_non_finite(path: &Path) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let down = tensor_offset(path, "blk.2.ffn_down.weight");
    file.write_all_at(&f32::NAN.to_le_bytes(), down + 4 * 10)
        .unwrap();
    let norm = tensor_offset(path, "output_norm.weight");
    file.write_all_at(&f32::INFINITY.to_le_bytes(), norm + 4 * 3)
        .unwrap();
    // Block 5 of a Q8_0 tensor: its f16 scale becomes NaN (0x7e00).
    let q = tensor_offset(path, "blk.1.attn_q.weight");
    file.write_all_at(&[0x00, 0x7e], q + 34 * 5).unwrap();
    file.sync_all().unwrap();
}

fn step_bytes(report: &PipelineReport, name: &str) -> u64 {
    report.step(name).unwrap().bytes
}

fn assert_ok(report: &PipelineReport, name: &str) {
    assert_eq!(
        report.step(name).unwrap().result,
        StepResult::Ok,
        "{name}: {report:#?}"
    );
}

fn non_finite_count(path: &Path) -> u64 {
    let map = byte_tier::MappedFile::open(path).unwrap();
    let gguf = map.parse().unwrap();
    gguf.tensors()
        .iter()
        .map(|t| {
            let r = byte_tier::codec::scan_tensor(&gguf, t).unwrap();
            r.nan_count + r.inf_count
        })
        .sum()
}

/// Attaches `model` (shared) to a new manager and runs the safety pipeline on it.
fn run_safety(
    model: &Path,
    options: SafetyOptions,
) -> (Manager, unified_manager::ModelId, PipelineReport) {
    let manager = Manager::new();
    let id = manager.attach(model, AttachMode::Shared).unwrap();
    let report = manager.safety(id, &options).unwrap();
    (manager, id, report)
}

macro_rules! snapshot_report {
    ($name:expr, $report:expr) => {
        insta::assert_json_snapshot!($name, $report, {
            ".target" => "[model]",
            ".steps[].duration_ms" => "[ms]",
            ".undo.memory_patches[]" => "[uuid]",
            ".undo.output" => "[output]",
            ".undo.boost" => "[boost]",
        })
    };
}

#[test]
fn safety_repairs_and_clamps_in_one_unit_and_reverts_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = demo_model(dir.path());
    plant_non_finite(&model);
    let before = std::fs::read(&model).unwrap();
    assert_eq!(non_finite_count(&model), 1 + 1 + 32);

    let (manager, id, report) = run_safety(
        &model,
        SafetyOptions {
            repair: Some(Repair::Zero),
            outlier_sigmas: Some(1.5),
            ..SafetyOptions::default()
        },
    );
    assert!(report.succeeded(), "{report:#?}");
    for step in ["scan", "repair", "outlier_clamp", "write"] {
        assert_ok(&report, step);
    }
    // The shared mapping writes through: the file holds what the report says.
    let after = std::fs::read(&model).unwrap();
    let changed = differing_bytes(&before, &after);
    assert_eq!(step_bytes(&report, "write"), changed);
    assert_eq!(
        step_bytes(&report, "repair") + step_bytes(&report, "outlier_clamp"),
        changed
    );
    assert!(step_bytes(&report, "outlier_clamp") > 0);
    assert_eq!(non_finite_count(&model), 0);
    assert!(report.undo.journal_transaction.is_some());
    snapshot_report!("safety_generated", &report);

    manager.revert_pipeline(id, &report).unwrap();
    assert!(
        std::fs::read(&model).unwrap() == before,
        "the revert is not exact"
    );
    let stats = manager.stats();
    assert_eq!(stats.actions_completed, 2);
    manager.detach_all(false).unwrap();
}

#[test]
fn safety_stops_at_a_manifest_mismatch_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = demo_model(dir.path());
    let manifest = {
        let map = byte_tier::MappedFile::open(&model).unwrap();
        byte_tier::verify::Manifest::of(&map.parse().unwrap()).to_text("demo")
    };
    plant_non_finite(&model);
    let before = std::fs::read(&model).unwrap();
    let (_manager, _, report) = run_safety(
        &model,
        SafetyOptions {
            repair: Some(Repair::Zero),
            manifest: Some(manifest),
            ..SafetyOptions::default()
        },
    );
    assert!(!report.succeeded());
    assert!(matches!(
        &report.step("integrity").unwrap().result,
        StepResult::Failed(why) if why.contains("blk.1.attn_q.weight")
    ));
    assert_eq!(report.steps.len(), 1);
    assert!(std::fs::read(&model).unwrap() == before);
    snapshot_report!("safety_manifest_mismatch", &report);
}

#[test]
fn safety_dry_run_plans_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let model = demo_model(dir.path());
    plant_non_finite(&model);
    let before = std::fs::read(&model).unwrap();
    let (_manager, _, report) = run_safety(
        &model,
        SafetyOptions {
            repair: Some(Repair::Clamp),
            dry_run: true,
            ..SafetyOptions::default()
        },
    );
    assert!(step_bytes(&report, "repair") > 0);
    assert!(matches!(
        report.step("write").unwrap().result,
        StepResult::Skipped(_)
    ));
    assert!(std::fs::read(&model).unwrap() == before);
}

#[test]
fn safety_on_the_real_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.gguf");
    std::fs::copy(tests::real_model(), &model).unwrap();
    let before = std::fs::read(&model).unwrap();
    let (manager, id, report) = run_safety(
        &model,
        SafetyOptions {
            repair: Some(Repair::Zero),
            outlier_sigmas: Some(30.0),
            ..SafetyOptions::default()
        },
    );
    assert!(report.succeeded(), "{report:#?}");
    let after = std::fs::read(&model).unwrap();
    assert_eq!(
        step_bytes(&report, "write"),
        differing_bytes(&before, &after)
    );
    assert!(step_bytes(&report, "outlier_clamp") > 0, "{report:#?}");
    snapshot_report!("safety_real_model", &report);
    manager.revert_pipeline(id, &report).unwrap();
    assert!(
        std::fs::read(&model).unwrap() == before,
        "the revert is not exact"
    );
}

fn blocks_of(g: &byte_tier::Gguf<'_>) -> u64 {
    let arch = g.architecture().unwrap().to_owned();
    g.get_u64(&format!("{arch}.block_count")).unwrap()
}

fn check_optimize(input: &Path, options: &OptimizeOptions) -> PipelineReport {
    let manager = Manager::new();
    let report = manager.optimize(input, options, &mut |_, _| {}).unwrap();
    assert!(report.succeeded(), "{report:#?}");
    let output = &options.output;
    let (map_in, map_out) = (
        byte_tier::MappedFile::open(input).unwrap(),
        byte_tier::MappedFile::open(output).unwrap(),
    );
    let (a, b) = (map_in.parse().unwrap(), map_out.parse().unwrap());
    assert_eq!(step_bytes(&report, "write"), b.file_len());
    // Pruned bytes: the tensors of the removed blocks.
    let removed: u64 = options
        .prune
        .iter()
        .flat_map(|l| {
            a.tensors()
                .iter()
                .filter(move |t| t.name.starts_with(&format!("blk.{l}.")))
        })
        .map(|t| t.n_bytes)
        .sum();
    assert_eq!(step_bytes(&report, "prune"), removed);
    // Requantized bytes: the converted tensors as the output holds them.
    if let Some((pattern, ty)) = &options.requantize {
        let converted: u64 = b
            .tensors()
            .iter()
            .filter(|t| pattern.is_match(&t.name) && t.ggml_type == *ty)
            .filter(|t| {
                a.tensor(&t.name)
                    .is_none_or(|o| o.ggml_type != *ty || o.dims != t.dims)
            })
            .map(|t| t.n_bytes)
            .sum();
        assert_eq!(step_bytes(&report, "requantize"), converted);
        // Each converted tensor holds its own source's data, under its new number.
        let kept: Vec<u64> = (0..blocks_of(&a))
            .filter(|l| !options.prune.contains(l))
            .collect();
        for t in b.tensors().iter().filter(|t| pattern.is_match(&t.name)) {
            let source_name = match t.name.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
                Some((n, tail)) => format!("blk.{}.{tail}", kept[n.parse::<usize>().unwrap()]),
                None => t.name.clone(),
            };
            let source = a.require_tensor(&source_name).unwrap();
            if source.ggml_type == *ty {
                continue;
            }
            let values =
                byte_tier::codec::dequantize(source.ggml_type, a.tensor_data(source)).unwrap();
            let expected = byte_tier::codec::quantize(*ty, &values).unwrap();
            assert!(
                b.tensor_data(t) == expected.as_slice(),
                "{} is not {source_name} requantized",
                t.name
            );
        }
    }
    assert_eq!(blocks_of(&b), blocks_of(&a) - options.prune.len() as u64);
    drop((map_in, map_out));
    manager
        .revert_pipeline(unified_manager::ModelId(0), &report)
        .unwrap();
    assert!(!output.exists(), "the revert left the output");
    report
}

#[test]
fn optimize_prunes_and_requantizes_into_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = demo_model(dir.path());
    let before = std::fs::read(&model).unwrap();
    let report = check_optimize(
        &model,
        &OptimizeOptions {
            output: dir.path().join("small.gguf"),
            requantize: Some((
                regex::Regex::new(r"ffn_down").unwrap(),
                byte_tier::GgmlType::Q8_0,
            )),
            prune: vec![1],
            dry_run: false,
            imatrix: None,
        },
    );
    snapshot_report!("optimize_generated", &report);
    assert!(
        std::fs::read(&model).unwrap() == before,
        "the input changed"
    );

    // The output may not be the input.
    let refused = Manager::new().optimize(
        &model,
        &OptimizeOptions {
            output: model.clone(),
            requantize: None,
            prune: vec![0],
            dry_run: false,
            imatrix: None,
        },
        &mut |_, _| {},
    );
    assert!(matches!(refused, Err(unified_manager::Error::Refused(_))));
}

#[test]
fn optimize_on_the_real_model() {
    let dir = tempfile::tempdir().unwrap();
    let report = check_optimize(
        &tests::real_model(),
        &OptimizeOptions {
            output: dir.path().join("optimized.gguf"),
            requantize: Some((
                regex::Regex::new(r"^blk\.(0|1)\.ffn_(up|gate)\.weight$").unwrap(),
                byte_tier::GgmlType::Q8_0,
            )),
            prune: vec![17],
            dry_run: false,
            imatrix: None,
        },
    );
    snapshot_report!("optimize_real_model", &report);
}

#[test]
fn boost_times_cold_and_warm_reads_and_releases_on_revert() {
    let dir = tempfile::tempdir().unwrap();
    let model = demo_model(dir.path());
    let manager = Manager::new();
    let report = manager
        .boost(
            &model,
            &BoostOptions {
                measure_cold: true,
                huge_pages: true,
                ..BoostOptions::default()
            },
        )
        .unwrap();
    assert!(report.succeeded(), "{report:#?}");
    for step in ["cold_read", "will_need", "warm_read"] {
        assert_ok(&report, step);
        assert_eq!(
            step_bytes(&report, step),
            std::fs::metadata(&model).unwrap().len()
        );
    }
    assert_eq!(manager.boosted().len(), 1);
    manager
        .revert_pipeline(unified_manager::ModelId(0), &report)
        .unwrap();
    assert!(manager.boosted().is_empty());
    let names: Vec<(&str, &StepResult)> = report
        .steps
        .iter()
        .filter(|s| s.step != "huge_pages")
        .map(|s| (s.step.as_str(), &s.result))
        .collect();
    insta::assert_debug_snapshot!("boost_steps", names);
}

const PRESET: &str = r#"
name = "calm"
version = 3
description = "a quieter output norm and a token cap"

[[memory_patch]]
name = "halve-output-norm"
tensor = "output_norm.weight"
transform = { scale = 0.5 }

[[memory_patch]]
name = "clamp-ffn-down"
tensor = "blk.0.ffn_down.weight"
elements = [0, 512]
transform = { clamp = [-0.04, 0.04] }
priority = 2

[[byte_patch]]
id = "b1"
name = "flip-embedding-byte"
target = { kind = "tensor", tensor = "token_embd.weight", start = 0, end = 2 }
operation = { op = "flip_bit", bit = 3 }

[[server_rule]]
name = "cap"
action = { type = "clamp", key = "max_tokens", max = 256.0 }
"#;

#[test]
fn presets_round_trip_through_export_and_import() {
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigDir::new(dir.path().join("a"));
    let calm = Preset::from_toml("calm.toml", PRESET).unwrap();
    config.save_preset(&calm).unwrap();
    let mut other = calm.clone();
    other.name = "other".into();
    other.version = 1;
    other.server_rules.clear();
    config.save_preset(&other).unwrap();
    let mut settings = config.settings().unwrap();
    settings.safety.outlier_sigmas = Some(6.0);
    settings.safety.server.redact = vec!["secret".into()];
    config.save_settings(&settings).unwrap();

    let exported = dir.path().join("export.json");
    config.export_to(&exported).unwrap();
    let empty = ConfigDir::new(dir.path().join("b"));
    let outcome = empty.import_from(&exported).unwrap();
    assert_eq!(outcome.presets, ["calm", "other"]);
    assert_eq!(empty.presets().unwrap(), config.presets().unwrap());
    assert_eq!(empty.settings().unwrap(), settings);
    for name in ["calm", "other"] {
        let file = |c: &ConfigDir| {
            std::fs::read(c.path().join("presets").join(format!("{name}.toml"))).unwrap()
        };
        assert_eq!(
            file(&empty),
            file(&config),
            "{name}.toml differs after import"
        );
    }
}

#[test]
fn invalid_documents_name_the_field_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigDir::new(dir.path());
    let cases = [
        (
            PRESET.replace("scale = 0.5", "scale = \"half\""),
            "memory_patch[0].transform.scale",
        ),
        (
            PRESET.replace("scale = 0.5", "scale = 0.5, zero = true"),
            "memory_patch[0].transform",
        ),
        (
            PRESET.replace("priority = 2", "priority = 2\ncolour = 1"),
            "memory_patch[1].colour",
        ),
        (
            PRESET.replace("max = 256.0", "max = 256.0, min = 512.0"),
            "server_rule[0]",
        ),
        (
            PRESET.replace("elements = [0, 512]", "elements = [512, 0]"),
            "memory_patch[1].elements",
        ),
    ];
    for (text, field) in cases {
        let error = Preset::from_toml("p.toml", &text).unwrap_err();
        assert!(
            matches!(&error, unified_manager::Error::Invalid { field: f, .. } if f == field),
            "expected field {field}, got: {error}"
        );
    }
    let bad_export = r#"{"schema_version": 1, "settings": {}, "presets": [{"name": "x", "version": 1, "memory_patch": [{"name": "m", "tensor": "t", "transform": {"scale": 1.0, "offset": 2.0}}]}]}"#;
    let path = dir.path().join("bad.json");
    std::fs::write(&path, bad_export).unwrap();
    let error = config.import_from(&path).unwrap_err().to_string();
    assert!(
        error.contains("presets[0].memory_patch[0].transform"),
        "{error}"
    );
    std::fs::write(
        &path,
        bad_export.replace("\"schema_version\": 1", "\"schema_version\": 9"),
    )
    .unwrap();
    let error = config.import_from(&path).unwrap_err().to_string();
    assert!(error.contains("schema_version"), "{error}");
    assert!(
        config.presets().unwrap().is_empty(),
        "an invalid import wrote presets"
    );
}

#[test]
fn a_preset_applies_as_one_unit_and_needs_a_server_for_its_rules() {
    let dir = tempfile::tempdir().unwrap();
    let model = demo_model(dir.path());
    let before = std::fs::read(&model).unwrap();
    let mut preset = Preset::from_toml("calm.toml", PRESET).unwrap();
    let manager = Manager::new();
    let id = manager.attach(&model, AttachMode::Shared).unwrap();
    // Its server rule needs a server: nothing is applied.
    assert!(manager.apply_preset(id, &preset).is_err());
    assert!(std::fs::read(&model).unwrap() == before);
    preset.server_rules.clear();
    let receipts = manager.apply_preset(id, &preset).unwrap();
    assert_eq!(receipts.len(), 3);
    let transaction = receipts[0].journal_transaction;
    assert!(transaction.is_some());
    assert!(
        receipts
            .iter()
            .all(|r| r.journal_transaction == transaction)
    );
    let after = std::fs::read(&model).unwrap();
    assert!(differing_bytes(&before, &after) > 0);
    // The byte patch flipped bit 3 of the embedding's first two bytes.
    let embd = tensor_offset(&model, "token_embd.weight") as usize;
    assert_eq!(after[embd] ^ before[embd], 0x08);
    assert_eq!(after[embd + 1] ^ before[embd + 1], 0x08);
    let stats = manager.stats();
    assert_eq!(stats.patches_applied, 3);
    for receipt in receipts.iter().rev() {
        manager.revert(id, receipt).unwrap();
    }
    assert!(std::fs::read(&model).unwrap() == before);
}

/// A proxy on loopback with an admin token and an upstream that is not there: rule and
/// cache changes need no upstream.
fn start_proxy(runtime: &tokio::runtime::Runtime) -> server_tier::Proxy {
    let mut config =
        server_tier::ProxyConfig::new("http://127.0.0.1:9", "127.0.0.1:0".parse().unwrap());
    config.admin = server_tier::AdminAccess::Token("s3cret".into());
    runtime.block_on(server_tier::Proxy::bind(config)).unwrap()
}

#[test]
fn safety_adds_server_rules_through_the_admin_api_and_removes_them_on_revert() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let proxy = start_proxy(&runtime);
    let control = proxy.control();
    let dir = tempfile::tempdir().unwrap();
    let model = demo_model(dir.path());
    let manager = Manager::new();
    let id = manager.attach(&model, AttachMode::Shared).unwrap();

    // A wrong token is refused, and the pipeline undoes itself.
    manager.attach_server(std::sync::Arc::new(
        unified_manager::server::AdminClient::new(
            &format!("http://{}", proxy.local_addr()),
            Some("wrong".into()),
        ),
    ));
    let options = SafetyOptions {
        server: Some(unified_manager::ServerDefaults {
            max_tokens: 64,
            redact: vec!["secret".into()],
        }),
        ..SafetyOptions::default()
    };
    let report = manager.safety(id, &options).unwrap();
    assert!(matches!(
        &report.step("server_rules").unwrap().result,
        StepResult::Failed(why) if why.contains("401")
    ));
    assert!(control.rules().rules().is_empty());

    manager.attach_server(std::sync::Arc::new(
        unified_manager::server::AdminClient::new(
            &format!("http://{}", proxy.local_addr()),
            Some("s3cret".into()),
        ),
    ));
    let report = manager.safety(id, &options).unwrap();
    assert_ok(&report, "server_rules");
    let names = |c: &server_tier::Control| {
        c.rules()
            .rules()
            .iter()
            .map(|r| r.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(&control),
        ["safety-max-tokens", "safety-n-predict", "safety-redact-1"]
    );
    assert_eq!(report.undo.server_rules, names(&control));
    // A second run leaves the rules it finds.
    let again = manager.safety(id, &options).unwrap();
    assert!(again.undo.server_rules.is_empty());
    manager.revert_pipeline(id, &report).unwrap();
    assert!(control.rules().rules().is_empty());

    // The in-process link: boost turns the cache on, its revert turns it off again.
    manager.attach_server(std::sync::Arc::new(control.clone()));
    assert!(!control.cache().enabled);
    let boost = manager
        .boost(
            &model,
            &BoostOptions {
                server_cache: true,
                ..BoostOptions::default()
            },
        )
        .unwrap();
    assert_ok(&boost, "server_cache");
    assert!(control.cache().enabled);
    manager.revert_pipeline(id, &boost).unwrap();
    assert!(!control.cache().enabled);
    runtime.block_on(proxy.shutdown()).unwrap();
}

#[test]
fn one_manager_serves_many_threads() {
    use memory_tier::{MemoryPatch, PatchTarget, Payload, ValueTransform};
    let dir = tempfile::tempdir().unwrap();
    let model = demo_model(dir.path());
    let before = std::fs::read(&model).unwrap();
    let manager = std::sync::Arc::new(Manager::new());
    let id = manager.attach(&model, AttachMode::Shared).unwrap();
    let scale = |block: u32, round: u32| {
        unified_manager::Patch::Memory(MemoryPatch::new(
            format!("t{block}-{round}"),
            PatchTarget::Tensor {
                name: format!("blk.{block}.ffn_norm.weight"),
                elements: None,
            },
            Payload::Transform(ValueTransform::Scale(0.5)),
        ))
    };
    // One apply and revert per block alone gives each block's byte count.
    let mut per_round = 0;
    for block in 0..4 {
        let before = manager.stats().bytes_modified;
        let receipt = manager.apply(id, scale(block, 99)).unwrap();
        manager.revert(id, &receipt).unwrap();
        per_round += manager.stats().bytes_modified - before;
    }
    let threads: Vec<_> = (0..4)
        .map(|block| {
            let manager = std::sync::Arc::clone(&manager);
            std::thread::spawn(move || {
                for round in 0..20 {
                    let receipt = manager.apply(id, scale(block, round)).unwrap();
                    manager.revert(id, &receipt).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let stats = manager.stats();
    assert_eq!((stats.patches_applied, stats.patches_reverted), (84, 84));
    assert_eq!(stats.bytes_modified, 21 * per_round);
    assert!(std::fs::read(&model).unwrap() == before);
}
