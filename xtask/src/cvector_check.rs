//! `cargo xtask cvector-check [SCALE...]`: the functional check of directional ablation
//! on the real model, with llama.cpp's own tools on both sides.
//!
//! 1. `llama-cvector-generator --method mean` makes a control vector from two short
//!    prompt files (the same prompts with a happy and a sad mood).
//! 2. `hotpatch ablate` removes that vector's direction from a copy of the model.
//! 3. llama-server serves the original and the ablated model, each without and with
//!    `--control-vector-scaled VECTOR:SCALE`, and answers the same prompts with the
//!    top-20 next-token probabilities (`n_probs`, greedy, no prompt cache).
//!
//! The report gives, per model and scale, how far steering moves the next-token
//! distribution (total variation over the union of the top-20 tokens, mean over the
//! prompts) and on how many prompts it changes the greedy token, and the ratio
//! ablated / original. Ablation removes the direction from what the model writes into
//! the residual stream; the control vector adds it to that stream directly, so the
//! ratio says how much of the steering went through the model's own writes.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

const POSITIVE: &[&str] = &[
    "I am so happy today, everything feels wonderful and bright.",
    "What a joyful morning, I could sing with delight.",
    "My heart is full of joy and I cannot stop smiling.",
    "This is the best day of my life, I feel cheerful and glad.",
    "I love this wonderful world and everyone in it.",
    "Good news again! I feel happy, grateful and full of hope.",
];
const NEGATIVE: &[&str] = &[
    "I am so sad today, everything feels awful and dark.",
    "What a miserable morning, I could cry with despair.",
    "My heart is full of grief and I cannot stop weeping.",
    "This is the worst day of my life, I feel gloomy and low.",
    "I hate this dreadful world and everyone in it.",
    "Bad news again! I feel unhappy, bitter and without hope.",
];
/// Prompts whose next token carries a mood.
const PROMPTS: &[&str] = &[
    "Today I feel",
    "When I woke up this morning, I was",
    "The weather outside is",
    "My opinion of the new film is that it was",
    "She read the letter and felt",
    "Our holiday by the sea was",
    "After the meeting, everyone seemed",
    "Life right now is",
];
const TOP: usize = 20;

pub fn run(args: &[String]) -> Result<()> {
    if crate::rerun_in_release_with("cvector-check", args)? {
        return Ok(());
    }
    let scales: Vec<f64> = if args.is_empty() {
        vec![0.5, 1.0, 2.0]
    } else {
        args.iter()
            .map(|a| {
                a.parse()
                    .with_context(|| format!("scale {a:?} is not a number"))
            })
            .collect::<Result<_>>()?
    };
    crate::run(crate::cargo().args(["build", "--release", "--quiet", "--bin", "hotpatch"]))?;
    let hotpatch = crate::workspace_root().join("target/release/hotpatch");
    let model = crate::env::real_model()?;
    let server = crate::llama_server::llama_server()?;
    let generator = server.with_file_name("llama-cvector-generator");
    let dir = std::env::temp_dir().join(format!("hotpatch-cvector-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = check(&dir, &hotpatch, &generator, &model, &scales);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn check(
    dir: &Path,
    hotpatch: &Path,
    generator: &Path,
    model: &Path,
    scales: &[f64],
) -> Result<()> {
    let positive = dir.join("positive.txt");
    let negative = dir.join("negative.txt");
    std::fs::write(&positive, POSITIVE.join("\n") + "\n")?;
    std::fs::write(&negative, NEGATIVE.join("\n") + "\n")?;
    let vector = dir.join("mood.gguf");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let output = Command::new(generator)
        .arg("-m")
        .arg(model)
        .args(["--method", "mean", "-t", &threads.to_string()])
        .arg("--positive-file")
        .arg(&positive)
        .arg("--negative-file")
        .arg(&negative)
        .arg("-o")
        .arg(&vector)
        .output()
        .with_context(|| format!("failed to start {}", generator.display()))?;
    if !output.status.success() || !vector.exists() {
        bail!(
            "llama-cvector-generator failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let ablated = dir.join("ablated.gguf");
    std::fs::copy(model, &ablated)?;
    let output = Command::new(hotpatch)
        .arg("ablate")
        .arg(&ablated)
        .arg("--direction")
        .arg(&vector)
        .arg("--json")
        .output()?;
    if !output.status.success() {
        bail!(
            "hotpatch ablate failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("hotpatch ablate --json printed no JSON")?;
    let edited = report["tensors"].as_array().map_or(0, Vec::len);
    println!(
        "cvector-check on {}: control vector from {} prompt pairs (mean), {edited} tensors ablated",
        model.display(),
        POSITIVE.len()
    );
    println!(
        "{:<6} {:>20} {:>20} {:>12} {:>14}",
        "scale", "TV original", "TV ablated", "TV ratio", "greedy moved"
    );

    let plain_original = answers(model, None)?;
    let plain_ablated = answers(&ablated, None)?;
    for &scale in scales {
        let steer = Some((vector.as_path(), scale));
        let steered_original = answers(model, steer)?;
        let steered_ablated = answers(&ablated, steer)?;
        let (tv_o, moved_o) = shift(&plain_original, &steered_original);
        let (tv_a, moved_a) = shift(&plain_ablated, &steered_ablated);
        println!(
            "{scale:<6} {tv_o:>20.4} {tv_a:>20.4} {:>11.2}x {:>6}/{} {:>3}/{}",
            tv_a / tv_o,
            moved_o,
            PROMPTS.len(),
            moved_a,
            PROMPTS.len()
        );
    }
    println!(
        "TV: total variation between the next-token distributions without and with the \
         control vector (top-{TOP} tokens, mean over {} prompts); greedy moved: prompts whose \
         greedy token changes, original then ablated",
        PROMPTS.len()
    );
    Ok(())
}

/// Each prompt's top next-token probabilities, by token id.
type Answer = Vec<(i64, f64)>;

/// Serves `model` (steered by `steer` when given) and asks every prompt.
fn answers(model: &Path, steer: Option<(&Path, f64)>) -> Result<Vec<Answer>> {
    let steer_args = steer.map(|(vector, scale)| {
        [
            "--control-vector-scaled".to_owned(),
            format!("{}:{scale}", vector.to_string_lossy()),
        ]
    });
    let extra: Vec<&str> = steer_args
        .iter()
        .flat_map(|a| a.iter().map(String::as_str))
        .collect();
    let server = tests::LlamaServer::start(model, &extra);
    PROMPTS
        .iter()
        .map(|prompt| {
            let body = serde_json::json!({
                "prompt": prompt,
                "n_predict": 1,
                "n_probs": TOP,
                "temperature": 0.0,
                "cache_prompt": false,
            });
            let (status, text) =
                tests::http_request(server.port, "POST", "/completion", Some(&body.to_string()))?;
            if status != 200 {
                bail!("llama-server answered {status}: {text}");
            }
            let value: serde_json::Value = serde_json::from_str(&text)?;
            let top = value["completion_probabilities"][0]["top_logprobs"]
                .as_array()
                .with_context(|| format!("no top_logprobs in {text}"))?;
            top.iter()
                .map(|t| {
                    let id = t["id"].as_i64().context("a top token without an id")?;
                    let logprob = t["logprob"]
                        .as_f64()
                        .context("a top token without logprob")?;
                    Ok((id, logprob.exp()))
                })
                .collect()
        })
        .collect()
}

/// Mean total variation over the prompts (a token outside one side's top list counts
/// as probability 0 there) and the number of prompts whose greedy token changed.
fn shift(plain: &[Answer], steered: &[Answer]) -> (f64, usize) {
    let mut total = 0.0;
    let mut moved = 0;
    for (a, b) in plain.iter().zip(steered) {
        let mut ids: Vec<i64> = a.iter().chain(b).map(|&(id, _)| id).collect();
        ids.sort_unstable();
        ids.dedup();
        let p = |side: &Answer, id: i64| side.iter().find(|t| t.0 == id).map_or(0.0, |t| t.1);
        total += 0.5
            * ids
                .iter()
                .map(|&id| (p(a, id) - p(b, id)).abs())
                .sum::<f64>();
        if a.first().map(|t| t.0) != b.first().map(|t| t.0) {
            moved += 1;
        }
    }
    (total / plain.len().max(1) as f64, moved)
}
