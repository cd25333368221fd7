//! Resolving a model spec to local files: a `.gguf` path, a Hugging Face style directory, or a hub
//! id (`org/name`, `org/name:file.gguf`, `org/name@revision`, `org/name@revision:file.gguf`)
//! fetched through `hf-hub` into its cache (or found there when offline).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hf_hub::{Cache, Repo, RepoType};

use super::gguf_tokenizer::read_gguf_assets;
use super::hf_dir::load_hf_dir;
use super::template::ChatTemplate;
use super::{ModelAssets, ModelError, SourceOptions, WeightsFormat};

/// A parsed model spec.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSpec {
    /// A local `.gguf` file.
    GgufFile(PathBuf),
    /// A local Hugging Face style directory.
    Directory(PathBuf),
    /// A hub repository, optionally at a revision and naming one file (a `.gguf`).
    Hub { repo: String, revision: Option<String>, file: Option<String> },
}

/// The local files a spec resolved to.
#[derive(Debug, Clone, PartialEq)]
pub enum LocalModel {
    /// A GGUF file (in the hub cache, its snapshot path).
    Gguf(PathBuf),
    /// A Hugging Face style directory (for a hub repo, its snapshot directory).
    Directory(PathBuf),
}

/// Files of a Hugging Face repository that `load_assets` needs besides the weights.
const HF_DIR_FILES: [&str; 5] =
    ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"];

/// Resolves `spec` and loads the tokenizer, chat template, EOS ids and context length it declares.
/// Weights are not loaded: the backend does that from `ModelAssets::weights`.
pub fn load_assets(spec: &str, opts: &SourceOptions) -> Result<ModelAssets, ModelError> {
    match resolve(&parse_spec(spec)?, spec, opts)? {
        LocalModel::Directory(dir) => load_hf_dir(&dir),
        LocalModel::Gguf(path) => load_gguf(&path),
    }
}

fn load_gguf(path: &Path) -> Result<ModelAssets, ModelError> {
    let gguf = read_gguf_assets(path)?;
    let chat_template = match gguf.chat_template {
        Some(src) => Some(Arc::new(
            ChatTemplate::new(&src, gguf.bos_token, gguf.eos_token)
                .map_err(|e| ModelError::Invalid(path.display().to_string(), format!("chat template: {e}")))?,
        )),
        None => None,
    };
    Ok(ModelAssets {
        weights: WeightsFormat::Gguf(path.to_path_buf()),
        tokenizer: Arc::new(gguf.tokenizer),
        chat_template,
        eos_token_ids: gguf.eos_token_ids,
        context_length: gguf.context_length,
    })
}

/// Parses a spec. An existing path wins; something that looks like a path but does not exist is
/// `NotFound`; `org/name[@revision][:file]` is a hub id.
pub fn parse_spec(spec: &str) -> Result<ModelSpec, ModelError> {
    let not_found = |why: &str| ModelError::NotFound(spec.to_string(), why.to_string());
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(ModelSpec::Directory(path.to_path_buf()));
    }
    if path.is_file() {
        return if spec.to_ascii_lowercase().ends_with(".gguf") {
            Ok(ModelSpec::GgufFile(path.to_path_buf()))
        } else {
            Err(ModelError::Invalid(spec.to_string(), "a model file must be a .gguf file".into()))
        };
    }
    let looks_like_path = spec.starts_with('/') || spec.starts_with('.') || spec.starts_with('~') || spec.contains('\\');
    if spec.trim().is_empty() || looks_like_path {
        return Err(not_found("no such file or directory"));
    }
    let (repo_part, file) = match spec.split_once(':') {
        Some((r, f)) if !f.is_empty() => (r, Some(f.to_string())),
        Some(_) => return Err(not_found("empty file name after ':'")),
        None => (spec, None),
    };
    let (repo, revision) = match repo_part.split_once('@') {
        Some((r, rev)) if !rev.is_empty() => (r, Some(rev.to_string())),
        Some(_) => return Err(not_found("empty revision after '@'")),
        None => (repo_part, None),
    };
    let valid_part = |s: &str| {
        !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) && !s.starts_with('.')
    };
    match repo.split_once('/') {
        Some((org, name)) if valid_part(org) && valid_part(name) => {
            Ok(ModelSpec::Hub { repo: repo.to_string(), revision, file })
        }
        _ => Err(not_found("no such file or directory, and not a hub id of the form org/name[@revision][:file.gguf]")),
    }
}

/// Turns a parsed spec into local files, downloading hub files unless `opts.offline`.
pub fn resolve(spec: &ModelSpec, raw: &str, opts: &SourceOptions) -> Result<LocalModel, ModelError> {
    match spec {
        ModelSpec::GgufFile(p) => Ok(LocalModel::Gguf(p.clone())),
        ModelSpec::Directory(p) => Ok(LocalModel::Directory(p.clone())),
        ModelSpec::Hub { repo, revision, file } => {
            let repo = Repo::with_revision(repo.clone(), RepoType::Model, revision.clone().unwrap_or("main".into()));
            if opts.offline {
                resolve_cached(&repo, file.as_deref(), raw, opts)
            } else {
                resolve_online(repo, file.clone(), raw.to_string(), opts.clone())
            }
        }
    }
}

/// The hub cache: `opts.cache_dir`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
fn cache(opts: &SourceOptions, raw: &str) -> Result<Cache, ModelError> {
    match &opts.cache_dir {
        Some(dir) => Ok(Cache::new(dir.clone())),
        // hf-hub panics when it finds no home directory; refuse cleanly instead.
        None if std::env::var_os("HF_HOME").is_none() && std::env::var_os("HOME").is_none() => Err(ModelError::NotFound(
            raw.to_string(),
            "no hub cache directory: set HF_HOME or pass a cache directory".into(),
        )),
        None => Ok(Cache::from_env()),
    }
}

/// Offline resolution: only what is already in the hub cache.
fn resolve_cached(repo: &Repo, file: Option<&str>, raw: &str, opts: &SourceOptions) -> Result<LocalModel, ModelError> {
    let cache = cache(opts, raw)?;
    let not_found = |why: String| ModelError::NotFound(raw.to_string(), why);
    let snapshot = snapshot_dir(&cache, repo).ok_or_else(|| {
        not_found(format!(
            "revision '{}' is not in the hub cache at {} (offline mode)",
            repo.revision(),
            cache.path().display()
        ))
    })?;
    let cached = |name: &str| Some(snapshot.join(name)).filter(|p| p.exists());
    if let Some(file) = file {
        let path = cached(file).ok_or_else(|| not_found(format!("file '{file}' is not in the hub cache (offline mode)")))?;
        return gguf_file(path, raw);
    }
    if let Some(config) = cached("config.json") {
        let dir = config.parent().map(Path::to_path_buf).unwrap_or(snapshot.clone());
        return Ok(LocalModel::Directory(dir));
    }
    let ggufs: Vec<String> = std::fs::read_dir(&snapshot)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.to_ascii_lowercase().ends_with(".gguf"))
        .collect();
    pick_gguf(ggufs, raw).map(|name| LocalModel::Gguf(snapshot.join(name)))
}

/// The snapshot directory of `repo`'s revision: `refs/<revision>` names the commit, or the
/// revision is itself a commit with a snapshot directory.
fn snapshot_dir(cache: &Cache, repo: &Repo) -> Option<PathBuf> {
    let root = cache.path().join(repo.folder_name());
    let commit = std::fs::read_to_string(root.join("refs").join(repo.revision()))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| repo.revision().to_string());
    Some(root.join("snapshots").join(commit)).filter(|p| p.is_dir())
}

fn gguf_file(path: PathBuf, raw: &str) -> Result<LocalModel, ModelError> {
    if path.to_string_lossy().to_ascii_lowercase().ends_with(".gguf") {
        Ok(LocalModel::Gguf(path))
    } else {
        Err(ModelError::Invalid(raw.to_string(), "the file named after ':' must be a .gguf file".into()))
    }
}

/// A repository without config.json must hold exactly one `.gguf`, or the spec must name one.
fn pick_gguf(mut ggufs: Vec<String>, raw: &str) -> Result<String, ModelError> {
    ggufs.sort();
    match ggufs.len() {
        0 => Err(ModelError::NotFound(raw.to_string(), "the repository has neither config.json nor a .gguf file".into())),
        1 => Ok(ggufs.remove(0)),
        _ => Err(ModelError::Invalid(
            raw.to_string(),
            format!("the repository has several .gguf files; pick one with '{raw}:FILE': {}", ggufs.join(", ")),
        )),
    }
}

/// Online resolution through hf-hub's tokio API. Runs on its own thread with its own runtime so
/// that it works whether or not the caller is inside a tokio runtime.
fn resolve_online(repo: Repo, file: Option<String>, raw: String, opts: SourceOptions) -> Result<LocalModel, ModelError> {
    let cache = cache(&opts, &raw)?;
    let cache_dir = cache.path().clone();
    let worker = std::thread::spawn(move || -> Result<LocalModel, ModelError> {
        let download = |e: String| ModelError::Download(raw.clone(), e);
        // A file-system error (not the network's) is about the cache: say which, and what it needs
        // (a read-only or full cache otherwise reads as a bare "I/O error ... (os error 30)").
        let fetch = |what: &str, e: hf_hub::api::tokio::ApiError| match e {
            hf_hub::api::tokio::ApiError::IoError(_) => download(format!(
                "{what}{e}, in the hub cache {} (it must be a writable directory with room for the model; HF_HOME chooses it)",
                cache_dir.display()
            )),
            e => download(format!("{what}{e}")),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| download(format!("cannot start a runtime: {e}")))?;
        rt.block_on(async {
            // Like ApiBuilder::from_env (token from the cache, HF_ENDPOINT honoured), on our cache.
            let mut builder = hf_hub::api::tokio::ApiBuilder::from_cache(cache).with_progress(opts.progress);
            if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
                builder = builder.with_endpoint(endpoint);
            }
            let api = builder.build().map_err(|e| fetch("", e))?;
            let repo_api = api.repo(repo);
            if let Some(file) = file {
                let path = repo_api.get(&file).await.map_err(|e| fetch(&format!("{file}: "), e))?;
                return gguf_file(path, &raw);
            }
            let info = repo_api.info().await.map_err(|e| fetch("", e))?;
            let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
            if names.iter().any(|n| n == "config.json") {
                let wanted = names.iter().filter(|n| !n.contains('/')).filter(|n| {
                    HF_DIR_FILES.contains(&n.as_str()) || n.ends_with(".safetensors") || n.ends_with(".safetensors.index.json")
                });
                let mut config_path = None;
                for name in wanted {
                    let path = repo_api.get(name).await.map_err(|e| fetch(&format!("{name}: "), e))?;
                    if name == "config.json" {
                        config_path = Some(path);
                    }
                }
                let dir = config_path.and_then(|p| p.parent().map(Path::to_path_buf));
                return dir.map(LocalModel::Directory).ok_or_else(|| download("config.json has no parent directory".into()));
            }
            let ggufs = names.into_iter().filter(|n| n.to_ascii_lowercase().ends_with(".gguf")).collect();
            let name = pick_gguf(ggufs, &raw)?;
            let path = repo_api.get(&name).await.map_err(|e| fetch(&format!("{name}: "), e))?;
            Ok(LocalModel::Gguf(path))
        })
    });
    worker
        .join()
        .unwrap_or_else(|_| Err(ModelError::Download(String::new(), "the download thread panicked".into())))
}
