//! Checks of what ships beside the binary: the Kubernetes manifests in `deploy/`, the
//! token schema in `tokens/`, the `Dockerfile`, and the commands the docs tell users to run.
//!
//! Nothing here needs a cluster or a container engine. Each manifest is deserialized into the
//! `k8s-openapi` type its `apiVersion`/`kind` name and serialized back; every field written
//! must survive the round trip, so a misspelt or misplaced field fails (k8s-openapi itself
//! ignores unknown fields). Every `causeway` command line in a container (its command and
//! args, or the `causeway` lines of a shell script) goes through the real CLI parser, and
//! every `causeway.yaml` in a ConfigMap goes through the real config loader, expanded with
//! the environment of the container that reads it. When `kubectl` is installed, every
//! kustomization is also built and its output checked the same way.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use causeway::cli::{Cli, Command as CliCommand, InterceptCommand};
use causeway::config::{Config, VipMode, expand_env};
use clap::Parser;
use clap::error::ErrorKind;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PersistentVolumeClaim, Pod, PodSpec, PodTemplateSpec, Secret, Service,
    ServiceAccount, Volume,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value as Json, json};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The uid the image runs as (Dockerfile `USER`), which the manifests must match.
const IMAGE_UID: i64 = 10001;

/// The image's environment (Dockerfile `ENV`), seen by every causeway container.
const IMAGE_ENV: &[(&str, &str)] = &[("CAUSEWAY_STATE", "/var/lib/causeway")];

// ---------------------------------------------------------------------------------------
// Loading manifests
// ---------------------------------------------------------------------------------------

/// One YAML document of a manifest file.
#[derive(Clone)]
struct Doc {
    /// `deploy/gateway/deployment.yaml#0`, for messages.
    origin: String,
    /// The directory of the file (or of the kustomization that built it).
    dir: PathBuf,
    json: Json,
}

impl Doc {
    fn str(&self, key: &str) -> &str {
        self.json.get(key).and_then(Json::as_str).unwrap_or_default()
    }
    fn kind(&self) -> &str {
        self.str("kind")
    }
    fn api_version(&self) -> &str {
        self.str("apiVersion")
    }
    fn name(&self) -> &str {
        self.json
            .pointer("/metadata/name")
            .and_then(Json::as_str)
            .unwrap_or_default()
    }
    fn is_kustomization(&self) -> bool {
        self.api_version().starts_with("kustomize.config.k8s.io/")
    }
    /// A JSON patch (RFC 6902, a list of operations), which kustomize applies to its target.
    fn is_json_patch(&self) -> bool {
        self.json.is_array()
    }
}

fn rel(path: &Path) -> String {
    path.strip_prefix(ROOT).unwrap_or(path).display().to_string()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `.yaml`/`.yml` file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The documents of a multi-document YAML text (empty documents skipped).
fn parse_docs(text: &str, origin: &str, dir: &Path) -> Vec<Doc> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = <serde_yaml::Value as serde::Deserialize>::deserialize(de)
            .unwrap_or_else(|e| panic!("{origin}#{i}: not YAML: {e}"));
        if value.is_null() {
            continue;
        }
        let json = serde_json::to_value(&value).unwrap_or_else(|e| panic!("{origin}#{i}: not JSON-like YAML: {e}"));
        docs.push(Doc {
            origin: format!("{origin}#{i}"),
            dir: dir.to_path_buf(),
            json,
        });
    }
    docs
}

/// Every document of every manifest in `deploy/`.
fn deploy_docs() -> Vec<Doc> {
    let root = Path::new(ROOT).join("deploy");
    let files = yaml_files(&root);
    assert!(!files.is_empty(), "no manifests in {}", root.display());
    files
        .iter()
        .flat_map(|f| parse_docs(&read(f), &rel(f), f.parent().expect("parent")))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Typed checks
// ---------------------------------------------------------------------------------------

/// Whether every field of `written` is in `typed` with the same value (`typed` may have more:
/// defaults of required fields). Returns the path of the first difference.
fn subset(written: &Json, typed: &Json, path: &str) -> Result<(), String> {
    match (written, typed) {
        (Json::Object(w), Json::Object(t)) => {
            for (k, v) in w {
                let p = format!("{path}.{k}");
                match t.get(k) {
                    Some(tv) => subset(v, tv, &p)?,
                    None => return Err(p),
                }
            }
            Ok(())
        }
        (Json::Array(w), Json::Array(t)) if w.len() == t.len() => {
            for (i, (a, b)) in w.iter().zip(t).enumerate() {
                subset(a, b, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (a, b) if a == b => Ok(()),
        _ => Err(path.to_string()),
    }
}

/// Deserializes `doc` as `T` and checks nothing was lost on the way.
fn typed<T: DeserializeOwned + Serialize>(doc: &Doc) -> T {
    let what = std::any::type_name::<T>().rsplit("::").next().unwrap_or_default();
    let t: T =
        serde_json::from_value(doc.json.clone()).unwrap_or_else(|e| panic!("{}: not a valid {what}: {e}", doc.origin));
    let back = serde_json::to_value(&t).expect("serialize");
    if let Err(path) = subset(&doc.json, &back, "") {
        panic!(
            "{}: `{path}` is not a field of {what} (misspelt or misplaced?) or has the wrong type",
            doc.origin
        );
    }
    t
}

/// A pod template found in a workload (or in a patch of one).
struct PodTemplate {
    origin: String,
    dir: PathBuf,
    labels: BTreeMap<String, String>,
    spec: PodSpec,
}

/// What the typed pass found.
#[derive(Default)]
struct Manifests {
    pods: Vec<PodTemplate>,
    config_maps: Vec<(Doc, ConfigMap)>,
    services: Vec<(Doc, Service)>,
    roles: Vec<(Doc, Role)>,
    kinds: BTreeSet<String>,
    /// Whether a pod reads the ConfigMaps of its own directory only (kustomize output, one
    /// namespace per directory) rather than every ConfigMap of that name in deploy/ (the
    /// sources, where the sidecar patch reads the examples' ConfigMaps too).
    same_dir_config: bool,
}

/// A container that a JSON patch adds to the pod template of its target.
struct PatchedContainer {
    /// `deploy/sidecar/intercept/statefulset-patch.yaml#0[0]`: the document and operation.
    origin: String,
    dir: PathBuf,
    init: bool,
    container: Container,
}

impl Manifests {
    fn push_pod(&mut self, doc: &Doc, template: Option<PodTemplateSpec>) {
        let Some(PodTemplateSpec {
            metadata,
            spec: Some(spec),
        }) = template
        else {
            return;
        };
        let labels = metadata.and_then(|m| m.labels).unwrap_or_default();
        self.pods.push(PodTemplate {
            origin: doc.origin.clone(),
            dir: doc.dir.clone(),
            labels: labels.into_iter().collect(),
            spec,
        });
    }

    /// ConfigMaps named `name`, anywhere.
    fn config_maps_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a (Doc, ConfigMap)> + 'a {
        self.config_maps.iter().filter(move |(d, _)| d.name() == name)
    }
}

/// Deserializes every document but kustomizations into the type its apiVersion/kind names,
/// and collects pod templates, ConfigMaps, Services and Roles.
fn check_objects(docs: &[Doc]) -> Manifests {
    let mut m = Manifests::default();
    let mut patched = Vec::new();
    for doc in docs {
        if doc.is_kustomization() {
            continue;
        }
        if doc.is_json_patch() {
            patched.extend(check_json_patch(doc));
            continue;
        }
        m.kinds.insert(doc.kind().to_string());
        match (doc.api_version(), doc.kind()) {
            ("apps/v1", "Deployment") => {
                let d: Deployment = typed(doc);
                m.push_pod(doc, d.spec.map(|s| s.template));
            }
            ("apps/v1", "StatefulSet") => {
                let s: StatefulSet = typed(doc);
                m.push_pod(doc, s.spec.map(|s| s.template));
            }
            ("apps/v1", "DaemonSet") => {
                let s: DaemonSet = typed(doc);
                m.push_pod(doc, s.spec.map(|s| s.template));
            }
            ("batch/v1", "Job") => {
                let j: Job = typed(doc);
                m.push_pod(doc, j.spec.map(|s| s.template));
            }
            ("batch/v1", "CronJob") => {
                let j: CronJob = typed(doc);
                m.push_pod(doc, j.spec.and_then(|s| s.job_template.spec).map(|s| s.template));
            }
            ("v1", "Pod") => {
                let p: Pod = typed(doc);
                let template = PodTemplateSpec {
                    metadata: Some(p.metadata),
                    spec: p.spec,
                };
                m.push_pod(doc, Some(template));
            }
            ("v1", "ConfigMap") => {
                let c: ConfigMap = typed(doc);
                m.config_maps.push((doc.clone(), c));
            }
            ("v1", "Service") => {
                let s: Service = typed(doc);
                m.services.push((doc.clone(), s));
            }
            ("v1", "Secret") => drop(typed::<Secret>(doc)),
            ("v1", "ServiceAccount") => drop(typed::<ServiceAccount>(doc)),
            ("v1", "PersistentVolumeClaim") => drop(typed::<PersistentVolumeClaim>(doc)),
            ("v1", "Namespace") => drop(typed::<Namespace>(doc)),
            ("rbac.authorization.k8s.io/v1", "Role") => {
                let r: Role = typed(doc);
                m.roles.push((doc.clone(), r));
            }
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => drop(typed::<RoleBinding>(doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => drop(typed::<ClusterRole>(doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => drop(typed::<ClusterRoleBinding>(doc)),
            ("networking.k8s.io/v1", "NetworkPolicy") => drop(typed::<NetworkPolicy>(doc)),
            ("policy/v1", "PodDisruptionBudget") => drop(typed::<PodDisruptionBudget>(doc)),
            (api, kind) => panic!(
                "{}: {api}/{kind} is not a kind this test knows; add its k8s-openapi type to check_objects",
                doc.origin
            ),
        }
    }
    for p in patched {
        let pod = pod_of_patched_container(p, &m);
        m.pods.push(pod);
    }
    m
}

/// Checks the operations of a JSON patch and returns the containers it adds to a pod
/// template, each checked as a Container.
fn check_json_patch(doc: &Doc) -> Vec<PatchedContainer> {
    let ops = doc.json.as_array().expect("a list");
    assert!(!ops.is_empty(), "{}: an empty JSON patch", doc.origin);
    let mut out = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let origin = format!("{}[{i}]", doc.origin);
        let obj = op
            .as_object()
            .unwrap_or_else(|| panic!("{origin}: a JSON patch operation is a mapping"));
        for key in obj.keys() {
            assert!(
                ["op", "path", "value", "from"].contains(&key.as_str()),
                "{origin}: unexpected key `{key}` in a JSON patch operation"
            );
        }
        let kind = obj.get("op").and_then(Json::as_str).unwrap_or_default();
        let path = obj
            .get("path")
            .and_then(Json::as_str)
            .unwrap_or_else(|| panic!("{origin}: no path"));
        assert!(path.starts_with('/'), "{origin}: path {path} is not a JSON pointer");
        match kind {
            "add" | "replace" | "test" => assert!(obj.contains_key("value"), "{origin}: {kind} without value"),
            "move" | "copy" => assert!(obj.contains_key("from"), "{origin}: {kind} without from"),
            "remove" => {}
            other => panic!("{origin}: `{other}` is not a JSON patch operation"),
        }
        let container = path
            .strip_prefix("/spec/template/spec/")
            .and_then(|rest| rest.split_once('/'))
            .filter(|(list, index)| ["initContainers", "containers"].contains(list) && !index.contains('/'));
        if let Some((list, index)) = container {
            if matches!(kind, "add" | "replace") {
                assert!(
                    index == "-" || index.parse::<usize>().is_ok(),
                    "{origin}: {path} does not name one container"
                );
                let value = Doc {
                    origin: origin.clone(),
                    dir: doc.dir.clone(),
                    json: obj["value"].clone(),
                };
                out.push(PatchedContainer {
                    origin,
                    dir: doc.dir.clone(),
                    init: list == "initContainers",
                    container: typed(&value),
                });
            }
        }
    }
    out
}

/// A pod template holding a container a JSON patch adds, so that it is checked like the
/// others. It mounts volumes of the pod it is added to, which the patch does not repeat: they
/// are looked up by name in the other pod templates of deploy/ (as ConfigMaps are), and must
/// be defined alike wherever they are.
fn pod_of_patched_container(p: PatchedContainer, m: &Manifests) -> PodTemplate {
    let mut volumes: Vec<Volume> = Vec::new();
    for mount in p.container.volume_mounts.iter().flatten() {
        let defs: Vec<&Volume> = m
            .pods
            .iter()
            .flat_map(|pod| pod.spec.volumes.iter().flatten())
            .filter(|v| v.name == mount.name)
            .collect();
        let first = *defs.first().unwrap_or_else(|| {
            panic!(
                "{}: mounts volume {}, which no pod template in deploy/ defines",
                p.origin, mount.name
            )
        });
        assert!(
            defs.iter().all(|v| *v == first),
            "{}: volume {} is defined differently in different manifests",
            p.origin,
            mount.name
        );
        if !volumes.iter().any(|v| v.name == first.name) {
            volumes.push(first.clone());
        }
    }
    let mut spec = PodSpec {
        volumes: Some(volumes),
        ..PodSpec::default()
    };
    if p.init {
        spec.init_containers = Some(vec![p.container]);
    } else {
        spec.containers = vec![p.container];
    }
    PodTemplate {
        origin: p.origin,
        dir: p.dir,
        labels: BTreeMap::new(),
        spec,
    }
}

/// Checks a kustomization file: its kind, its keys, and that everything it names exists.
/// Returns the files it uses (resources and patches), relative to its directory.
fn check_kustomization(doc: &Doc) -> BTreeSet<PathBuf> {
    let origin = &doc.origin;
    match (doc.api_version(), doc.kind()) {
        ("kustomize.config.k8s.io/v1beta1", "Kustomization") | ("kustomize.config.k8s.io/v1alpha1", "Component") => {}
        (a, k) => panic!("{origin}: {a}/{k} is neither a Kustomization nor a Component"),
    }
    const KEYS: &[&str] = &[
        "apiVersion",
        "kind",
        "namespace",
        "resources",
        "components",
        "patches",
        "images",
        "labels",
        "configMapGenerator",
        "secretGenerator",
        "generatorOptions",
        "replacements",
    ];
    let obj = doc
        .json
        .as_object()
        .unwrap_or_else(|| panic!("{origin}: not a mapping"));
    for key in obj.keys() {
        assert!(KEYS.contains(&key.as_str()), "{origin}: unexpected key `{key}`");
    }
    assert!(
        obj.contains_key("resources") || obj.contains_key("patches"),
        "{origin}: neither resources nor patches"
    );
    let mut used = BTreeSet::new();
    let list = |key: &str| -> Vec<Json> { obj.get(key).and_then(Json::as_array).cloned().unwrap_or_default() };
    for r in list("resources") {
        let r = r
            .as_str()
            .unwrap_or_else(|| panic!("{origin}: resources holds a non-string"));
        let path = doc.dir.join(r);
        assert!(path.exists(), "{origin}: resource {r} does not exist");
        if path.is_dir() {
            assert!(
                path.join("kustomization.yaml").is_file(),
                "{origin}: {r} has no kustomization.yaml"
            );
        }
        used.insert(PathBuf::from(r));
    }
    for c in list("components") {
        let c = c
            .as_str()
            .unwrap_or_else(|| panic!("{origin}: components holds a non-string"));
        let k = doc.dir.join(c).join("kustomization.yaml");
        let comp = parse_docs(&read(&k), &rel(&k), k.parent().expect("parent"));
        assert_eq!(
            comp.first().map(Doc::kind),
            Some("Component"),
            "{origin}: {c} is not a Component"
        );
    }
    for p in list("patches") {
        let path = p
            .get("path")
            .and_then(Json::as_str)
            .unwrap_or_else(|| panic!("{origin}: a patch without `path` (inline patches are not used here)"));
        let file = doc.dir.join(path);
        assert!(file.is_file(), "{origin}: patch {path} does not exist");
        let patch = parse_docs(&read(&file), &rel(&file), &doc.dir);
        assert_eq!(patch.len(), 1, "{origin}: patch {path} must be one document");
        if patch[0].is_json_patch() {
            // Its operations are checked with the manifests (check_json_patch).
            assert!(
                p.pointer("/target/kind").and_then(Json::as_str).is_some(),
                "{origin}: JSON patch {path} needs a target kind"
            );
            used.insert(PathBuf::from(path));
            continue;
        }
        assert!(
            !patch[0].name().is_empty(),
            "{}: a patch needs metadata.name",
            patch[0].origin
        );
        if let Some(kind) = p.pointer("/target/kind").and_then(Json::as_str) {
            assert_eq!(patch[0].kind(), kind, "{origin}: patch {path} is not a {kind}");
        }
        used.insert(PathBuf::from(path));
    }
    used
}

// ---------------------------------------------------------------------------------------
// Command lines
// ---------------------------------------------------------------------------------------

/// Whether a container runs the causeway image.
fn is_causeway_image(c: &Container) -> bool {
    let image = c.image.as_deref().unwrap_or_default();
    let last = image.rsplit('/').next().unwrap_or_default();
    last.split([':', '@']).next() == Some("causeway")
}

/// Kubernetes' `$(VAR)` expansion of command, args and env values: a reference to a
/// variable the container defines is replaced, any other is left as is; `$$` is `$`.
fn k8s_expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((value, after)) = tail
            .strip_prefix("$(")
            .and_then(|after| after.find(')').map(|end| (&after[..end], &after[end + 1..])))
            .and_then(|(name, after)| env.get(name).map(|v| (v, after)))
        {
            out.push_str(value);
            rest = after;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The simple commands of a POSIX shell script, as argument vectors, with `$VAR` and
/// `${VAR}` expanded by `var`. Enough shell for the scripts in manifests and docs: quotes,
/// backslashes, comments, and `;`, `&`, `|`, `&&`, `||`, `(`, `)` and newlines between
/// commands. Leading keywords (`if`, `then`, `exec` …) are dropped.
fn shell_commands(script: &str, var: &dyn Fn(&str) -> String) -> Vec<Vec<String>> {
    fn dollar(chars: &mut std::iter::Peekable<std::str::Chars>, word: &mut String, var: &dyn Fn(&str) -> String) {
        let mut name = String::new();
        if chars.peek() == Some(&'{') {
            chars.next();
            for c in chars.by_ref() {
                if c == '}' {
                    break;
                }
                name.push(c);
            }
        } else {
            assert_ne!(chars.peek(), Some(&'('), "command substitution is not supported here");
            while let Some(&c) = chars.peek() {
                if !(c.is_ascii_alphanumeric() || c == '_') {
                    break;
                }
                name.push(c);
                chars.next();
            }
        }
        if name.is_empty() {
            word.push('$');
        } else {
            word.push_str(&var(&name));
        }
    }
    let mut commands = Vec::new();
    let mut cmd: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = script.chars().peekable();
    let flush_word = |cmd: &mut Vec<String>, word: &mut String, in_word: &mut bool| {
        if *in_word {
            cmd.push(std::mem::take(word));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    word.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(n) = chars.next() {
                                word.push(n);
                            }
                        }
                        '$' => dollar(&mut chars, &mut word, var),
                        c => word.push(c),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') | None => {}
                Some(n) => {
                    word.push(n);
                    in_word = true;
                }
            },
            '$' => {
                in_word = true;
                dollar(&mut chars, &mut word, var);
            }
            '#' if !in_word => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
            }
            ' ' | '\t' => flush_word(&mut cmd, &mut word, &mut in_word),
            '\n' | ';' | '&' | '|' | '(' | ')' => {
                flush_word(&mut cmd, &mut word, &mut in_word);
                if !cmd.is_empty() {
                    commands.push(std::mem::take(&mut cmd));
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    flush_word(&mut cmd, &mut word, &mut in_word);
    if !cmd.is_empty() {
        commands.push(cmd);
    }
    const KEYWORDS: &[&str] = &["if", "then", "else", "elif", "do", "while", "until", "!", "{", "exec"];
    commands
        .into_iter()
        .map(|c| {
            c.into_iter()
                .skip_while(|w| KEYWORDS.contains(&w.as_str()))
                .collect::<Vec<_>>()
        })
        .filter(|c| !c.is_empty())
        .collect()
}

/// The outcome of parsing one causeway command line.
enum Parsed {
    Ok(Box<Cli>),
    /// `--version` or `--help`: accepted, nothing to run.
    Info,
}

/// Parses a causeway command line with the real CLI; panics with `origin` if it is refused.
fn parse_cli(argv: &[String], origin: &str) -> Parsed {
    assert_eq!(
        argv.first().map(String::as_str),
        Some("causeway"),
        "{origin}: not a causeway command"
    );
    match Cli::try_parse_from(argv) {
        Ok(cli) => Parsed::Ok(Box::new(cli)),
        Err(e) if matches!(e.kind(), ErrorKind::DisplayVersion | ErrorKind::DisplayHelp) => Parsed::Info,
        Err(e) => panic!("{origin}: the CLI refuses `{}`:\n{e}", argv.join(" ")),
    }
}

/// A test value for an environment variable set from the downward API or a ConfigMap.
fn env_value_from(name: &str, from: &k8s_openapi::api::core::v1::EnvVarSource, m: &Manifests, origin: &str) -> String {
    if let Some(f) = &from.field_ref {
        return match f.field_path.as_str() {
            "metadata.name" => "grid-0".into(),
            "metadata.namespace" => "grid".into(),
            "status.podIP" => "10.1.0.7".into(),
            "spec.nodeName" => "node-1".into(),
            other => panic!("{origin}: env {name}: no test value for field {other}"),
        };
    }
    if let Some(r) = &from.config_map_key_ref {
        let found = m
            .config_maps_named(&r.name)
            .find_map(|(_, c)| c.data.as_ref().and_then(|d| d.get(&r.key)).cloned());
        return found.unwrap_or_else(|| {
            panic!(
                "{origin}: env {name} comes from ConfigMap {} key {}, which no manifest defines",
                r.name, r.key
            )
        });
    }
    if from.secret_key_ref.is_some() {
        return "secret".into();
    }
    panic!("{origin}: env {name}: no test value for {from:?}")
}

/// The environment a causeway container sees: the image's, then its own `env` (in order, each value
/// `$(VAR)`-expanded with the ones before, as Kubernetes does).
fn container_env(c: &Container, m: &Manifests, origin: &str) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = IMAGE_ENV.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => k8s_expand(v, &env),
            (None, Some(from)) => env_value_from(&e.name, from, m, origin),
            (None, None) => String::new(),
        };
        env.insert(e.name.clone(), value);
    }
    env
}

/// What checking the causeway containers found.
#[derive(Default)]
struct CommandReport {
    /// `origin: causeway …` of every command line that parsed.
    parsed: Vec<String>,
    /// Origins of the ConfigMaps whose causeway.yaml a container read and the loader accepted.
    loaded: BTreeSet<String>,
    /// Every causeway.yaml a container read, as loaded.
    configs: Vec<ReadConfig>,
}

/// What reads a causeway.yaml.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Reader {
    /// `causeway run`: the agent.
    Agent,
    /// `causeway intercept install`: the nftables rule of vips.mode: intercept.
    Intercept,
}

/// One causeway.yaml as one container read it.
struct ReadConfig {
    /// The pod template's origin.
    pod: String,
    container: String,
    reader: Reader,
    /// The ConfigMap's origin.
    config_map: String,
    config: Config,
}

/// Checks every causeway container: its command lines parse, and the configuration
/// `causeway run --config FILE` reads loads with the container's environment.
fn check_causeway_containers(m: &Manifests) -> CommandReport {
    let mut report = CommandReport::default();
    for pod in &m.pods {
        for c in all_containers(&pod.spec) {
            if !is_causeway_image(c) {
                continue;
            }
            let origin = format!("{} container {}", pod.origin, c.name);
            let env = container_env(c, m, &origin);
            let mut argv: Vec<String> = c.command.clone().unwrap_or_else(|| vec!["causeway".into()]);
            argv.extend(c.args.iter().flatten().cloned());
            let argv: Vec<String> = argv.iter().map(|a| k8s_expand(a, &env)).collect();
            let lines: Vec<Vec<String>> = match argv[0].as_str() {
                "causeway" => vec![argv.clone()],
                "sh" | "/bin/sh" | "bash" | "/bin/bash" => {
                    let at = argv
                        .iter()
                        .position(|a| a == "-c")
                        .unwrap_or_else(|| panic!("{origin}: a shell without -c"));
                    let script = argv
                        .get(at + 1)
                        .unwrap_or_else(|| panic!("{origin}: -c without a script"));
                    let var = |name: &str| {
                        env.get(name).cloned().unwrap_or_else(|| {
                            panic!("{origin}: the script uses ${name}, which the container does not set")
                        })
                    };
                    shell_commands(script, &var)
                        .into_iter()
                        .filter(|c| c[0] == "causeway")
                        .collect()
                }
                other => panic!("{origin}: runs {other}; expected causeway or a shell script"),
            };
            for line in lines {
                let Parsed::Ok(cli) = parse_cli(&line, &origin) else {
                    continue;
                };
                report.parsed.push(format!("{origin}: {}", line.join(" ")));
                let (reader, config) = match &cli.command {
                    CliCommand::Run { config } => (Reader::Agent, config),
                    CliCommand::Intercept(InterceptCommand::Install { config }) => (Reader::Intercept, config),
                    _ => continue,
                };
                let path = config.clone().unwrap_or_else(|| cli.state.join("causeway.yaml"));
                for (config_map, config) in load_mounted_config(pod, c, &path, &env, m, &origin) {
                    report.loaded.insert(config_map.clone());
                    report.configs.push(ReadConfig {
                        pod: pod.origin.clone(),
                        container: c.name.clone(),
                        reader,
                        config_map,
                        config,
                    });
                }
            }
        }
    }
    report
}

/// Finds the ConfigMap(s) mounted at `path` in container `c` and loads their causeway.yaml
/// through the real loader, `${VAR}`-expanded with `env`. Returns the ConfigMaps' origins
/// and what they hold.
fn load_mounted_config(
    pod: &PodTemplate,
    c: &Container,
    path: &Path,
    env: &BTreeMap<String, String>,
    m: &Manifests,
    origin: &str,
) -> Vec<(String, Config)> {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|v| path.starts_with(&v.mount_path))
        .max_by_key(|v| v.mount_path.len())
        .unwrap_or_else(|| panic!("{origin}: nothing is mounted where `run` reads {}", path.display()));
    let file = path
        .strip_prefix(&mount.mount_path)
        .expect("prefix")
        .to_string_lossy()
        .into_owned();
    let volume = pod
        .spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("{origin}: volume {} is not defined", mount.name));
    let cm = volume
        .config_map
        .as_ref()
        .unwrap_or_else(|| panic!("{origin}: {} is not a ConfigMap volume", mount.name));
    let key = match &cm.items {
        Some(items) => items
            .iter()
            .find(|i| i.path == file)
            .map(|i| i.key.clone())
            .unwrap_or_else(|| panic!("{origin}: ConfigMap volume {} has no item at {file}", mount.name)),
        None => file,
    };
    let mut loaded = Vec::new();
    let maps = m
        .config_maps_named(&cm.name)
        .filter(|(d, _)| !m.same_dir_config || d.dir == pod.dir);
    for (doc, map) in maps {
        let text = map
            .data
            .as_ref()
            .and_then(|d| d.get(&key))
            .unwrap_or_else(|| panic!("{}: no key {key}, which {origin} reads", doc.origin));
        let what = format!("{} ({key}, as read by {origin})", doc.origin);
        let expanded = expand_env(text, |name| env.get(name).cloned()).unwrap_or_else(|e| panic!("{what}: {e}"));
        let config = Config::parse(&expanded, &what).unwrap_or_else(|e| panic!("{e}"));
        check_config_against_container(&config, c, &what);
        loaded.push((doc.origin.clone(), config));
    }
    assert!(
        !loaded.is_empty(),
        "{origin}: no manifest defines ConfigMap {}",
        cm.name
    );
    loaded
}

/// The agent's listeners agree with the container: probes reach the metrics listener, and
/// declared container ports cover the link, DNS and metrics ports.
fn check_config_against_container(config: &Config, c: &Container, what: &str) {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let ports: Vec<(String, i32, String)> = c
        .ports
        .iter()
        .flatten()
        .map(|p| {
            let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            (p.name.clone().unwrap_or_default(), p.container_port, proto)
        })
        .collect();
    let probes = [&c.readiness_probe, &c.liveness_probe, &c.startup_probe];
    for probe in probes.into_iter().flatten() {
        let Some(get) = &probe.http_get else { continue };
        let metrics = config
            .metrics
            .unwrap_or_else(|| panic!("{what}: the container has HTTP probes but `metrics:` is off"));
        assert!(
            metrics.ip().is_unspecified(),
            "{what}: the kubelet probes the pod IP, but metrics listens on {metrics}"
        );
        let port = match &get.port {
            IntOrString::Int(p) => *p,
            IntOrString::String(name) => ports
                .iter()
                .find(|(n, ..)| n == name)
                .map(|(_, p, _)| *p)
                .unwrap_or_else(|| panic!("{what}: probe port {name} is not a container port")),
        };
        assert_eq!(
            port,
            i32::from(metrics.port()),
            "{what}: a probe misses the metrics port"
        );
        assert!(
            ["/healthz", "/readyz"].contains(&get.path.as_deref().unwrap_or_default()),
            "{what}: probe path {:?} is not /healthz or /readyz",
            get.path
        );
    }
    if ports.is_empty() {
        return;
    }
    let has = |port: u16, proto: &str| ports.iter().any(|(_, p, pr)| *p == i32::from(port) && pr == proto);
    assert!(
        has(config.listen.port(), "UDP"),
        "{what}: link port {}/UDP is not a container port",
        config.listen.port()
    );
    for dns in &config.dns.listen {
        if dns.ip().is_loopback() {
            continue;
        }
        assert!(
            has(dns.port(), "UDP") && has(dns.port(), "TCP"),
            "{what}: DNS {dns} needs UDP and TCP container ports"
        );
    }
    if let Some(metrics) = config.metrics {
        assert!(
            has(metrics.port(), "TCP"),
            "{what}: metrics port {} is not a container port",
            metrics.port()
        );
    }
}

// ---------------------------------------------------------------------------------------
// Privileges
// ---------------------------------------------------------------------------------------

/// What a causeway container runs that reads a causeway.yaml, if anything.
fn reader_of(c: &Container) -> Option<Reader> {
    let mut argv: Vec<String> = c.command.clone().unwrap_or_else(|| vec!["causeway".into()]);
    argv.extend(c.args.iter().flatten().cloned());
    if argv.first().map(String::as_str) != Some("causeway") {
        return None;
    }
    match Cli::try_parse_from(&argv).ok()?.command {
        CliCommand::Run { .. } => Some(Reader::Agent),
        CliCommand::Intercept(InterceptCommand::Install { .. }) => Some(Reader::Intercept),
        _ => None,
    }
}

/// The volume holding the state directory of causeway container `c` (`CAUSEWAY_STATE`).
fn state_volume(c: &Container) -> Option<String> {
    let env = c.env.iter().flatten().find(|e| e.name == "CAUSEWAY_STATE");
    let state = env.and_then(|e| e.value.clone()).unwrap_or_else(|| {
        IMAGE_ENV
            .iter()
            .find(|(k, _)| *k == "CAUSEWAY_STATE")
            .map(|(_, v)| v.to_string())
            .expect("the image sets CAUSEWAY_STATE")
    });
    c.volume_mounts
        .iter()
        .flatten()
        .filter(|m| Path::new(&state).starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .map(|m| m.name.clone())
}

/// Checks the privileges of every causeway container of `pod`; returns how many it checked.
///
/// Each runs with no privilege escalation, a read-only root filesystem, every capability
/// dropped, and as the image's non-root user, adding no capability, with these exceptions.
/// Capabilities added to a container take effect only for uid 0 (Kubernetes sets no ambient
/// capabilities), so a container that adds one runs as root, and adds only:
/// * NET_ADMIN, for `causeway intercept install` (the nftables rule of vips.mode: intercept),
///   which needs it;
/// * NET_RAW, for the agent (`causeway run`; UDP in vips.mode: intercept), optionally.
///
/// Every container of a pod, init containers first.
fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers.iter().flatten().chain(&spec.containers)
}

/// The names of a pod's init containers, in order.
fn init_names(spec: &PodSpec) -> Vec<&str> {
    spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect()
}

/// A container sharing the agent's state volume (which writes its 0700 state directory)
/// runs as the agent's uid, root included.
fn check_privileges(pod: &PodTemplate) -> usize {
    let pod_sc = pod.spec.security_context.clone().unwrap_or_default();
    let containers: Vec<&Container> = all_containers(&pod.spec).filter(|c| is_causeway_image(c)).collect();
    let uid_of = |c: &Container| {
        c.security_context
            .as_ref()
            .and_then(|s| s.run_as_user)
            .or(pod_sc.run_as_user)
    };
    let agent = containers.iter().find(|c| reader_of(c) == Some(Reader::Agent));
    let agent_state = agent.and_then(|a| state_volume(a).map(|v| (a.name.clone(), v, uid_of(a))));
    for c in &containers {
        let origin = format!("{} container {}", pod.origin, c.name);
        let sc = c.security_context.clone().unwrap_or_default();
        assert_eq!(
            sc.allow_privilege_escalation,
            Some(false),
            "{origin}: allowPrivilegeEscalation"
        );
        assert_eq!(
            sc.read_only_root_filesystem,
            Some(true),
            "{origin}: readOnlyRootFilesystem"
        );
        assert_ne!(sc.privileged, Some(true), "{origin}: privileged");
        let caps = sc.capabilities.clone().unwrap_or_default();
        assert_eq!(
            caps.drop,
            Some(vec!["ALL".to_string()]),
            "{origin}: drops all capabilities"
        );
        let added = caps.add.unwrap_or_default();
        let reader = reader_of(c);
        let allowed: &[&str] = match reader {
            Some(Reader::Intercept) => &["NET_ADMIN"],
            Some(Reader::Agent) => &["NET_RAW"],
            None => &[],
        };
        for cap in &added {
            assert!(
                allowed.contains(&cap.as_str()),
                "{origin}: adds {cap}; it may add only {allowed:?}"
            );
        }
        if reader == Some(Reader::Intercept) {
            assert_eq!(
                added,
                vec!["NET_ADMIN".to_string()],
                "{origin}: `causeway intercept install` needs NET_ADMIN"
            );
        }
        let shares_state = agent_state.as_ref().filter(|(name, volume, _)| {
            *name != c.name
                && c.volume_mounts
                    .iter()
                    .flatten()
                    .any(|m| m.name == *volume && m.read_only != Some(true))
        });
        let (uid, why) = match shares_state {
            _ if !added.is_empty() => (Some(0), "an added capability takes effect only for root"),
            Some((_, _, uid)) => (
                *uid,
                "it writes the agent's state directory (0700), so it runs as the agent's uid",
            ),
            None => (Some(IMAGE_UID), "runs as the image's user"),
        };
        assert_eq!(uid_of(c), uid, "{origin}: {why}");
        let non_root = sc.run_as_non_root.or(pod_sc.run_as_non_root);
        if uid == Some(0) {
            assert_eq!(non_root, Some(false), "{origin}: runs as root, so runAsNonRoot: false");
        } else {
            assert_eq!(non_root, Some(true), "{origin}: runAsNonRoot");
        }
    }
    containers.len()
}

/// Merges `patch` into `base` as a strategic-merge patch does for the fields used here:
/// mappings key by key, lists of named items by name, other lists replaced.
fn strategic_merge(base: &mut Json, patch: &Json) {
    match (base, patch) {
        (Json::Object(b), Json::Object(p)) => {
            for (k, v) in p {
                match b.get_mut(k) {
                    Some(bv) => strategic_merge(bv, v),
                    None => drop(b.insert(k.clone(), v.clone())),
                }
            }
        }
        (Json::Array(b), Json::Array(p)) if p.iter().all(|i| i.get("name").is_some()) => {
            for item in p {
                match b.iter_mut().find(|x| x.get("name") == item.get("name")) {
                    Some(bi) => strategic_merge(bi, item),
                    None => b.push(item.clone()),
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// Pod templates of patches that change containers defined by another Component (a
/// container with no image: the patch only changes it), with each such container merged
/// onto the one it changes, found by name in the pod templates of the other Components.
fn compose_container_patches(m: &Manifests) -> Vec<PodTemplate> {
    let is_component = |dir: &Path| {
        let k = dir.join("kustomization.yaml");
        k.is_file() && parse_docs(&read(&k), &rel(&k), dir).first().map(Doc::kind) == Some("Component")
    };
    let mut out = Vec::new();
    for pod in &m.pods {
        if !all_containers(&pod.spec).any(|c| c.image.is_none()) {
            continue;
        }
        assert!(
            is_component(&pod.dir),
            "{}: a container without an image outside a Component",
            pod.origin
        );
        let merge = |c: &Container| -> Container {
            if c.image.is_some() {
                return c.clone();
            }
            let bases: Vec<&Container> = m
                .pods
                .iter()
                .filter(|p| p.dir != pod.dir && is_component(&p.dir))
                .flat_map(|p| all_containers(&p.spec))
                .filter(|b| b.name == c.name && b.image.is_some())
                .collect();
            assert_eq!(
                bases.len(),
                1,
                "{}: container {} changes no (or no single) container of another Component",
                pod.origin,
                c.name
            );
            let mut json = serde_json::to_value(bases[0]).expect("serialize");
            strategic_merge(&mut json, &serde_json::to_value(c).expect("serialize"));
            serde_json::from_value(json).expect("a container")
        };
        let mut spec = pod.spec.clone();
        spec.init_containers = spec.init_containers.map(|cs| cs.iter().map(merge).collect());
        spec.containers = spec.containers.iter().map(merge).collect();
        out.push(PodTemplate {
            origin: format!("{} (merged onto the containers it changes)", pod.origin),
            dir: pod.dir.clone(),
            labels: pod.labels.clone(),
            spec,
        });
    }
    out
}

// ---------------------------------------------------------------------------------------
// Tests: manifests
// ---------------------------------------------------------------------------------------

#[test]
fn every_manifest_is_the_kubernetes_object_it_claims_to_be() {
    let docs = deploy_docs();
    let m = check_objects(&docs);
    for kind in [
        "Deployment",
        "StatefulSet",
        "Service",
        "ConfigMap",
        "ServiceAccount",
        "PersistentVolumeClaim",
    ] {
        assert!(m.kinds.contains(kind), "deploy/ has no {kind}: {:?}", m.kinds);
    }
    // Every directory is a kustomization, and every manifest in it is used by it (or, for
    // an alternative form such as kube-dns's, named in its comments).
    let mut dirs: BTreeSet<PathBuf> = docs.iter().map(|d| d.dir.clone()).collect();
    dirs.remove(&Path::new(ROOT).join("deploy"));
    for dir in dirs {
        let k = dir.join("kustomization.yaml");
        assert!(k.is_file(), "{} has no kustomization.yaml", rel(&dir));
        let kdocs = parse_docs(&read(&k), &rel(&k), &dir);
        assert_eq!(kdocs.len(), 1, "{}: one document", rel(&k));
        let used = check_kustomization(&kdocs[0]);
        let ktext = read(&k);
        for f in yaml_files(&dir) {
            if f.parent() != Some(dir.as_path()) || f == k {
                continue;
            }
            let name = f.file_name().expect("name").to_string_lossy().into_owned();
            assert!(
                used.contains(Path::new(&name)) || ktext.contains(&name),
                "{}: {name} is neither used nor mentioned by the kustomization",
                rel(&dir)
            );
        }
    }
}

#[test]
fn every_causeway_command_line_in_the_manifests_parses_and_every_causeway_yaml_loads() {
    let m = check_objects(&deploy_docs());
    let report = check_causeway_containers(&m);
    for line in &report.parsed {
        eprintln!("parsed {line}");
    }
    // The gateway's initContainer creates the site, its container runs the agent, and the
    // sidecar runs one too.
    let seen = |dir: &str, sub: &str| {
        report
            .parsed
            .iter()
            .any(|l| l.starts_with(&format!("deploy/{dir}/")) && l.contains(&format!(" {sub}")))
    };
    assert!(
        seen("gateway", "init --site london"),
        "the gateway's init command was not checked"
    );
    assert!(
        seen("gateway", "run --config"),
        "the gateway's run command was not checked"
    );
    assert!(
        seen("sidecar", "run --config"),
        "the sidecar's run command was not checked"
    );
    assert!(
        seen("sidecar/intercept", "intercept install --config"),
        "the intercept Component's install command was not checked"
    );
    // Every causeway.yaml in a ConfigMap is one some causeway container reads, and loaded.
    for (doc, cm) in &m.config_maps {
        if cm.data.as_ref().is_some_and(|d| d.contains_key("causeway.yaml")) {
            assert!(
                report.loaded.contains(&doc.origin),
                "{}: no causeway container in deploy/ reads this causeway.yaml",
                doc.origin
            );
        }
    }
    assert!(
        report.loaded.len() >= 6,
        "gateway, sidecar and four examples: {:?}",
        report.loaded
    );
}

#[test]
fn services_select_pods_and_name_their_ports() {
    let m = check_objects(&deploy_docs());
    for (doc, svc) in &m.services {
        let spec = svc.spec.as_ref().unwrap_or_else(|| panic!("{}: no spec", doc.origin));
        let selector = spec
            .selector
            .clone()
            .unwrap_or_else(|| panic!("{}: no selector", doc.origin));
        let pods: Vec<&PodTemplate> = m
            .pods
            .iter()
            .filter(|p| p.dir == doc.dir && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            .collect();
        assert!(
            !pods.is_empty(),
            "{}: selects no pod template of its directory",
            doc.origin
        );
        for port in spec.ports.iter().flatten() {
            let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name)) = &port.target_port
            else {
                continue;
            };
            let proto = port.protocol.clone().unwrap_or_else(|| "TCP".into());
            let found = pods.iter().any(|p| {
                p.spec
                    .containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .any(|cp| {
                        cp.name.as_deref() == Some(name) && cp.protocol.clone().unwrap_or_else(|| "TCP".into()) == proto
                    })
            });
            assert!(found, "{}: targetPort {name}/{proto} is no container port", doc.origin);
        }
    }
}

/// Every causeway container runs unprivileged (see [`check_privileges`] for the two
/// capabilities vips.mode: intercept may add, and why those containers run as root).
#[test]
fn causeway_containers_run_unprivileged_and_without_api_access() {
    let docs = deploy_docs();
    let m = check_objects(&docs);
    let mut checked = 0;
    for pod in &m.pods {
        let is_gateway = pod.origin.starts_with("deploy/gateway/");
        if is_gateway {
            assert_eq!(
                pod.spec.automount_service_account_token,
                Some(false),
                "{}: no API token",
                pod.origin
            );
            assert_eq!(
                pod.spec.service_account_name.as_deref(),
                Some("causeway"),
                "{}",
                pod.origin
            );
        }
    }
    // Patches that change containers of another Component (no image of their own), merged
    // onto them as kustomize does, and checked whole.
    let composed = compose_container_patches(&m);
    assert!(
        !composed.is_empty(),
        "deploy/sidecar/intercept-udp changes the sidecar's containers"
    );
    for pod in m.pods.iter().chain(&composed) {
        checked += check_privileges(pod);
    }
    assert!(
        checked >= 8,
        "gateway init and agent, sidecar credentials and agent, the intercept rule, and the three \
         containers of intercept-udp: {checked}"
    );
    // Least privilege: nothing cluster-wide, and a Role, if one is ever added, only reads.
    for doc in &docs {
        assert!(
            !matches!(doc.kind(), "ClusterRole" | "ClusterRoleBinding"),
            "{}: causeway needs no cluster-wide rights",
            doc.origin
        );
    }
    for (doc, role) in &m.roles {
        for rule in role.rules.iter().flatten() {
            for verb in &rule.verbs {
                assert!(
                    ["get", "list", "watch"].contains(&verb.as_str()),
                    "{}: verb {verb}",
                    doc.origin
                );
            }
        }
    }
}

/// The environment the sources' sidecar configurations are expanded with where no
/// container's environment applies.
fn sidecar_test_env(name: &str) -> Option<String> {
    let value = match name {
        "SITE" => "london",
        "NAMESPACE" => "grid",
        "POD_NAME" => "grid-0",
        "POD_IP" => "10.1.0.7",
        _ => return None,
    };
    Some(value.to_string())
}

/// The causeway.yaml of the ConfigMap `causeway-sidecar` in `file` (a manifest or a patch),
/// loaded; None when the file holds no such ConfigMap.
fn sidecar_config(file: &Path) -> Option<Config> {
    let docs = parse_docs(&read(file), &rel(file), file.parent().expect("parent"));
    let doc = docs
        .iter()
        .find(|d| d.kind() == "ConfigMap" && d.name() == "causeway-sidecar")?;
    let text = doc
        .json
        .pointer("/data/causeway.yaml")
        .and_then(Json::as_str)
        .unwrap_or_else(|| panic!("{}: no causeway.yaml", doc.origin));
    let expanded = expand_env(text, sidecar_test_env).unwrap_or_else(|e| panic!("{}: {e}", doc.origin));
    Some(Config::parse(&expanded, &doc.origin).unwrap_or_else(|e| panic!("{e}")))
}

/// Each example (its directory's name) and the vips.mode of its sidecar. Checks that the
/// mode and the Components agree: deploy/sidecar first, deploy/sidecar/intercept after it
/// exactly when the sidecar's causeway.yaml says `mode: intercept`, and
/// deploy/sidecar/intercept-udp, if used, after that.
fn example_modes() -> Vec<(String, VipMode)> {
    let deploy = Path::new(ROOT).join("deploy");
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let [sidecar, intercept, udp] =
        ["sidecar", "sidecar/intercept", "sidecar/intercept-udp"].map(|d| canon(&deploy.join(d)));
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(deploy.join("examples"))
        .expect("deploy/examples")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    dirs.sort();
    let mut out = Vec::new();
    for dir in dirs {
        let name = dir.file_name().expect("name").to_string_lossy().into_owned();
        let k = dir.join("kustomization.yaml");
        let kdoc = parse_docs(&read(&k), &rel(&k), &dir).remove(0);
        let list = |key: &str| -> Vec<String> {
            kdoc.json
                .get(key)
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
                .map(|v| match v {
                    Json::String(s) => s.clone(),
                    other => other["path"].as_str().unwrap_or_default().to_string(),
                })
                .collect()
        };
        let components: Vec<PathBuf> = list("components").iter().map(|c| canon(&dir.join(c))).collect();
        let at = |c: &Path| components.iter().position(|x| x == c);
        let (at_sidecar, at_intercept, at_udp) = (at(&sidecar), at(&intercept), at(&udp));
        assert!(at_sidecar.is_some(), "{}: does not use deploy/sidecar", kdoc.origin);
        if let Some(i) = at_intercept {
            assert!(
                at_sidecar < Some(i),
                "{}: deploy/sidecar/intercept goes after deploy/sidecar",
                kdoc.origin
            );
        }
        if let Some(u) = at_udp {
            assert!(
                at_intercept.is_some_and(|i| i < u),
                "{}: deploy/sidecar/intercept-udp goes after deploy/sidecar/intercept",
                kdoc.origin
            );
        }
        let configs: Vec<Config> = list("patches")
            .iter()
            .chain(&list("resources"))
            .filter_map(|f| sidecar_config(&dir.join(f)))
            .collect();
        assert_eq!(configs.len(), 1, "{}: one causeway-sidecar ConfigMap", kdoc.origin);
        let mode = configs[0].vips.mode;
        assert_eq!(
            mode == VipMode::Intercept,
            at_intercept.is_some(),
            "{}: the sidecar's causeway.yaml says vips.mode: {mode}, so the Component deploy/sidecar/intercept \
             must {}be used",
            kdoc.origin,
            if mode == VipMode::Intercept { "" } else { "not " }
        );
        out.push((name, mode));
    }
    out
}

#[test]
fn sidecar_modes_agree_across_components_examples_and_docs() {
    let deploy = Path::new(ROOT).join("deploy");
    let modes = example_modes();
    for (example, mode) in [("etcd", VipMode::Intercept), ("zookeeper", VipMode::Intercept)] {
        assert!(
            modes.contains(&(example.to_string(), mode)),
            "{example} runs in {mode} mode: {modes:?}"
        );
    }
    assert!(
        modes.iter().any(|(_, m)| *m == VipMode::Listen),
        "an example keeps listen mode: {modes:?}"
    );

    // The intercept Component's default causeway.yaml is deploy/sidecar's, in intercept mode.
    let base = sidecar_config(&deploy.join("sidecar/configmap.yaml")).expect("deploy/sidecar's ConfigMap");
    let mut intercept =
        sidecar_config(&deploy.join("sidecar/intercept/configmap-patch.yaml")).expect("the intercept ConfigMap");
    assert_eq!(base.vips.mode, VipMode::Listen);
    assert_eq!(intercept.vips.mode, VipMode::Intercept);
    intercept.vips.mode = base.vips.mode;
    assert_eq!(
        intercept, base,
        "deploy/sidecar/intercept/configmap-patch.yaml differs from deploy/sidecar/configmap.yaml in more than vips.mode"
    );

    // The examples' table says which mode each uses.
    let readme = read(&deploy.join("examples/README.md"));
    let rows: Vec<Vec<String>> = readme
        .lines()
        .filter(|l| l.starts_with('|'))
        .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
        .collect();
    for (example, mode) in &modes {
        let row = rows
            .iter()
            .find(|r| r.get(1).is_some_and(|c| c.to_lowercase().starts_with(example.as_str())))
            .unwrap_or_else(|| panic!("deploy/examples/README.md: no table row for {example}"));
        assert!(
            row.get(2).is_some_and(|c| c.starts_with(&format!("`{mode}`"))),
            "deploy/examples/README.md: the row of {example} must say `{mode}` in its second column: {row:?}"
        );
    }

    // deploy/README.md's table names every directory with a kustomization but the examples'.
    let docs = read(&deploy.join("README.md"));
    for f in yaml_files(&deploy) {
        let dir = f.parent().expect("parent");
        let name = rel(dir);
        let name = name.strip_prefix("deploy/").unwrap_or(&name);
        if f.file_name().is_some_and(|n| n == "kustomization.yaml") && !name.starts_with("examples/") {
            assert!(
                docs.contains(&format!("| `{name}/` |")),
                "deploy/README.md does not list {name}/"
            );
        }
    }
}

/// `kubectl kustomize DIR`, parsed; panics with kubectl's message when the build fails.
fn kustomize(dir: &Path, origin: &str) -> Vec<Doc> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl kustomize {origin}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let docs = parse_docs(&text, &format!("{origin} (built)"), dir);
    assert!(!docs.is_empty(), "{origin}: built nothing");
    docs
}

/// vips.mode: intercept and its nftables rule go together in every built pod: an agent in
/// intercept mode has an init container that installs the rule before it starts, from the
/// same causeway.yaml (so the same range and port); a pod whose agent listens has none (the
/// rule would send the grid's traffic to a port nobody listens on); and only an agent in
/// intercept mode adds NET_RAW. Returns the origins of the pods in intercept mode.
fn check_intercept_pods(m: &Manifests, report: &CommandReport) -> BTreeSet<String> {
    let mut intercepting = BTreeSet::new();
    for pod in &m.pods {
        let read = |reader: Reader| -> Vec<&ReadConfig> {
            report
                .configs
                .iter()
                .filter(|r| r.pod == pod.origin && r.reader == reader)
                .collect()
        };
        let (agents, rules) = (read(Reader::Agent), read(Reader::Intercept));
        let intercept = agents.iter().any(|a| a.config.vips.mode == VipMode::Intercept);
        if !intercept {
            if let Some(r) = rules.first() {
                panic!(
                    "{} container {}: installs the nftables rule of vips.mode: intercept, but no agent of the \
                     pod runs in that mode: the rule would send the grid's traffic to a port nobody listens on",
                    pod.origin, r.container
                );
            }
            for a in &agents {
                let c = all_containers(&pod.spec)
                    .find(|c| c.name == a.container)
                    .expect("the agent container");
                let caps = c.security_context.as_ref().and_then(|s| s.capabilities.as_ref());
                assert!(
                    caps.and_then(|c| c.add.as_ref()).is_none_or(|a| a.is_empty()),
                    "{} container {}: adds a capability, which only vips.mode: intercept uses",
                    pod.origin,
                    a.container
                );
            }
            continue;
        }
        intercepting.insert(pod.origin.clone());
        assert!(
            !rules.is_empty(),
            "{}: the agent runs in vips.mode: intercept, but no init container runs `causeway intercept \
             install` (add the Component deploy/sidecar/intercept)",
            pod.origin
        );
        let inits = init_names(&pod.spec);
        for a in &agents {
            assert_eq!(
                a.config.vips.mode,
                VipMode::Intercept,
                "{}: agents of one pod in different modes",
                pod.origin
            );
            for r in &rules {
                assert!(
                    inits.contains(&r.container.as_str()),
                    "{}: {} must be an init container",
                    pod.origin,
                    r.container
                );
                let (ri, ai) = (
                    inits.iter().position(|n| *n == r.container),
                    inits.iter().position(|n| *n == a.container),
                );
                assert!(
                    ai.is_none() || ri < ai,
                    "{}: {} must run before the agent {} starts: init containers {inits:?}",
                    pod.origin,
                    r.container,
                    a.container
                );
                assert_eq!(
                    r.config_map, a.config_map,
                    "{}: {} and the agent read different causeway.yaml",
                    pod.origin, r.container
                );
                assert_eq!(
                    (r.config.vips.cidr, r.config.vips.intercept_port),
                    (a.config.vips.cidr, a.config.vips.intercept_port),
                    "{}: the rule and the agent disagree on vips.cidr or vips.intercept_port",
                    pod.origin
                );
            }
        }
    }
    intercepting
}

/// `kubectl kustomize` each directory, and check the output like the sources. Skipped, with
/// a note, where kubectl is not installed.
#[test]
fn kustomize_output_passes_the_same_checks_when_kubectl_is_installed() {
    let version = Command::new("kubectl").args(["version", "--client"]).output();
    if !version.is_ok_and(|o| o.status.success()) {
        eprintln!("note: kubectl is not installed: kustomize builds not checked");
        return;
    }
    let root = Path::new(ROOT).join("deploy");
    let dirs: BTreeSet<PathBuf> = yaml_files(&root)
        .into_iter()
        .filter(|f| f.file_name().is_some_and(|n| n == "kustomization.yaml"))
        .map(|f| f.parent().expect("parent").to_path_buf())
        .collect();
    assert!(dirs.len() >= 7, "{dirs:?}");
    let mut all = Vec::new();
    for dir in &dirs {
        // A Component of patches only (sidecar/intercept …) has nothing to patch on its own:
        // it is built with the examples that use it, and below.
        let k = dir.join("kustomization.yaml");
        let kdoc = parse_docs(&read(&k), &rel(&k), dir).remove(0);
        if kdoc.kind() == "Component" && kdoc.json.get("resources").is_none() {
            continue;
        }
        all.extend(kustomize(dir, &rel(dir)));
    }
    // A grid with every sidecar Component, intercept-udp included, which no example uses.
    // (kustomize takes relative paths only.)
    let overlay = tempfile::tempdir().expect("tempdir");
    let from = overlay.path().canonicalize().expect("canonical tempdir");
    let up = "../".repeat(from.components().count() - 1);
    let to = |d: &str| {
        let target = root.join(d).canonicalize().expect("canonical path");
        format!("{up}{}", target.strip_prefix("/").expect("absolute").display())
    };
    let kustomization = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [to("examples/zookeeper")],
        "components": [to("sidecar/intercept-udp")],
    });
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        serde_yaml::to_string(&kustomization).expect("yaml"),
    )
    .expect("write the overlay");
    let udp_origin = "zookeeper with deploy/sidecar/intercept-udp";
    all.extend(kustomize(overlay.path(), udp_origin));

    // Built output of every directory together, so that references across directories
    // (the examples read the gateway's ConfigMap) resolve as they do in a namespace.
    let mut m = check_objects(&all);
    m.same_dir_config = true;
    let report = check_causeway_containers(&m);
    // Every built causeway.yaml is read by a container of its own build (the Component alone
    // has no StatefulSet to patch).
    for (doc, cm) in &m.config_maps {
        let read_by_someone = report.loaded.contains(&doc.origin);
        if cm.data.as_ref().is_some_and(|d| d.contains_key("causeway.yaml"))
            && !doc.origin.starts_with("deploy/sidecar ")
        {
            assert!(
                read_by_someone,
                "{}: no causeway container of this build reads it",
                doc.origin
            );
        }
    }
    let intercepting = check_intercept_pods(&m, &report);
    let mut checked = 0;
    for pod in &m.pods {
        checked += check_privileges(pod);
    }
    // The gateway's two, two per grid pod, and the rule of each pod in intercept mode.
    assert!(checked >= 17, "causeway containers checked: {checked}");
    let modes = example_modes();
    for (example, mode) in &modes {
        let sidecar = m
            .pods
            .iter()
            .find(|p| p.origin.starts_with(&format!("deploy/examples/{example} (built)")))
            .unwrap_or_else(|| panic!("{example}: no pod template built"));
        let inits = init_names(&sidecar.spec);
        assert!(
            inits.contains(&"causeway"),
            "{example}: the sidecar was not added: {inits:?}"
        );
        assert_eq!(sidecar.spec.dns_policy.as_deref(), Some("None"), "{example}: dnsPolicy");
        assert!(
            report
                .parsed
                .iter()
                .any(|l| l.starts_with(&format!("deploy/examples/{example} (built)"))),
            "{example}: the sidecar's command was not checked"
        );
        assert_eq!(
            intercepting.contains(&sidecar.origin),
            *mode == VipMode::Intercept,
            "{example}: built in the wrong mode (expected {mode})"
        );
    }
    // The grid with intercept-udp: the agent as root with NET_RAW and nothing else, the
    // credentials as root too, the rule first.
    let udp = m
        .pods
        .iter()
        .find(|p| p.origin.starts_with(udp_origin))
        .expect("the intercept-udp build has a pod");
    assert!(
        intercepting.contains(&udp.origin),
        "{udp_origin}: not in intercept mode"
    );
    let inits: Vec<&Container> = udp.spec.init_containers.iter().flatten().collect();
    assert_eq!(
        inits.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["causeway-intercept", "causeway-credentials", "causeway"],
        "{udp_origin}: init containers"
    );
    let sc = |name: &str| {
        inits
            .iter()
            .find(|c| c.name == name)
            .and_then(|c| c.security_context.clone())
            .unwrap_or_default()
    };
    assert_eq!(sc("causeway").run_as_user, Some(0), "{udp_origin}: the agent's uid");
    assert_eq!(
        sc("causeway").capabilities.and_then(|c| c.add),
        Some(vec!["NET_RAW".to_string()]),
        "{udp_origin}: the agent's added capabilities"
    );
    assert_eq!(
        sc("causeway-credentials").run_as_user,
        Some(0),
        "{udp_origin}: the credentials' uid"
    );
}

#[test]
fn the_gateway_is_one_replica_recreated_with_a_persistent_state_volume() {
    let docs = deploy_docs();
    let doc = docs
        .iter()
        .find(|d| d.origin.starts_with("deploy/gateway/") && d.kind() == "Deployment")
        .expect("the gateway Deployment");
    let d: Deployment = typed(doc);
    let spec = d.spec.expect("spec");
    assert_eq!(spec.replicas, Some(1), "two agents must never share a site's state");
    assert_eq!(spec.strategy.and_then(|s| s.type_).as_deref(), Some("Recreate"));
    let pod = spec.template.spec.expect("pod spec");
    let state = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.persistent_volume_claim.is_some())
        .expect("a PVC volume for the state");
    let claim = &state.persistent_volume_claim.as_ref().expect("pvc").claim_name;
    assert!(
        docs.iter()
            .any(|d| d.kind() == "PersistentVolumeClaim" && d.name() == claim),
        "PVC {claim} is not defined"
    );
    let agent = pod
        .containers
        .iter()
        .find(|c| c.name == "causeway")
        .expect("agent container");
    let state_env = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "CAUSEWAY_STATE")
        .and_then(|e| e.value.clone())
        .expect("CAUSEWAY_STATE");
    let mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == state.name)
        .expect("the state volume is mounted");
    assert!(
        Path::new(&state_env).starts_with(&mount.mount_path) && state_env != mount.mount_path,
        "the state dir ({state_env}) must be a directory inside the volume ({}), which init can make 0700",
        mount.mount_path
    );
}

// ---------------------------------------------------------------------------------------
// Tests: token schema
// ---------------------------------------------------------------------------------------

#[test]
fn token_schema_accepts_an_issued_token_and_rejects_tampered_ones() {
    let schema: Json = serde_json::from_str(&read(&Path::new(ROOT).join("tokens/schema.json"))).expect("schema JSON");
    jsonschema::draft202012::meta::validate(&schema).expect("a valid draft 2020-12 schema");
    let validator = jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("schema compiles");

    // A real token, issued by a running agent.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut london = common::Site::init(dir.path(), "london");
    let mut paris = common::Site::init(dir.path(), "paris");
    london.start();
    paris.start();
    let path = london.issue(&["--expires", "10m"], &dir.path().join("paris.token"));
    let text = read(&path);
    let token: Json = serde_yaml::from_str(&text).expect("token YAML");
    let errors: Vec<String> = validator.iter_errors(&token).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "the schema refuses an issued token: {errors:?}\n{text}"
    );

    // The schema describes exactly the fields the agent writes, all required.
    let written: BTreeSet<&str> = token.as_object().expect("mapping").keys().map(String::as_str).collect();
    let properties: BTreeSet<&str> = schema["properties"]
        .as_object()
        .expect("properties")
        .keys()
        .map(String::as_str)
        .collect();
    let required: BTreeSet<&str> = schema["required"]
        .as_array()
        .expect("required")
        .iter()
        .filter_map(Json::as_str)
        .collect();
    assert_eq!(written, properties, "schema properties vs. issued token");
    assert_eq!(written, required, "every field is required");
    let readme = read(&Path::new(ROOT).join("tokens/README.md"));
    for field in &written {
        assert!(
            readme.contains(&format!("| `{field}` |")),
            "tokens/README.md does not document `{field}`"
        );
    }

    // And the token it accepted is a working one.
    let out = paris.ok(&["token", "redeem", path.to_str().expect("utf-8")]);
    assert!(out.starts_with("linked to london"), "{out}");

    // Tampered tokens: the schema refuses each; so does the parser where it checks the same.
    let with = |f: &dyn Fn(&mut serde_json::Map<String, Json>)| {
        let mut t = token.clone();
        f(t.as_object_mut().expect("mapping"));
        t
    };
    let secret = token["secret"].as_str().expect("secret").to_string();
    let grant = token["grant"].as_str().expect("grant").to_string();
    let mac = token["mac"].as_str().expect("mac").to_string();
    let mut cases: Vec<(String, Json, bool)> = vec![
        (
            "secret one digit short".into(),
            with(&|t| drop(t.insert("secret".into(), json!(secret[1..])))),
            true,
        ),
        (
            "secret one digit long".into(),
            with(&|t| drop(t.insert("secret".into(), json!(format!("{secret}0"))))),
            true,
        ),
        (
            "secret not hex".into(),
            with(&|t| drop(t.insert("secret".into(), json!(format!("g{}", &secret[1..]))))),
            true,
        ),
        (
            "grant one digit short".into(),
            with(&|t| drop(t.insert("grant".into(), json!(grant[1..])))),
            true,
        ),
        (
            "extra field".into(),
            with(&|t| drop(t.insert("key".into(), json!("-----BEGIN PRIVATE KEY-----")))),
            true,
        ),
        (
            "version 1 (before the mac)".into(),
            with(&|t| drop(t.insert("version".into(), json!(1)))),
            true,
        ),
        (
            "version 3".into(),
            with(&|t| drop(t.insert("version".into(), json!(3)))),
            true,
        ),
        (
            "mac one digit short".into(),
            with(&|t| drop(t.insert("mac".into(), json!(mac[1..])))),
            true,
        ),
        (
            "issuer not a DNS label".into(),
            with(&|t| drop(t.insert("issuer".into(), json!("London")))),
            true,
        ),
        (
            "no addresses".into(),
            with(&|t| drop(t.insert("addresses".into(), json!([])))),
            true,
        ),
        (
            "address without port".into(),
            with(&|t| drop(t.insert("addresses".into(), json!(["gw.london.example"])))),
            false,
        ),
        (
            "ca not PEM".into(),
            with(&|t| drop(t.insert("ca".into(), json!("not a certificate")))),
            true,
        ),
        (
            "expires not a time".into(),
            with(&|t| drop(t.insert("expires".into(), json!("tomorrow")))),
            true,
        ),
        (
            "expires not UTC".into(),
            with(&|t| drop(t.insert("expires".into(), json!("2030-01-01T12:00:00+01:00")))),
            false,
        ),
    ];
    for field in &written {
        let f = field.to_string();
        cases.push((format!("missing {field}"), with(&|t| drop(t.remove(&f))), true));
    }
    for (what, tampered, parser_too) in cases {
        assert!(!validator.is_valid(&tampered), "the schema accepts a token with {what}");
        if parser_too {
            let yaml = serde_yaml::to_string(&tampered).expect("yaml");
            assert!(
                causeway::token::Token::parse(&yaml).is_err(),
                "the parser accepts a token with {what}"
            );
        }
    }
    london.stop();
    paris.stop();
}

// ---------------------------------------------------------------------------------------
// Tests: Dockerfile and docs
// ---------------------------------------------------------------------------------------

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if current.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(part) = t.strip_suffix('\\') {
            current.push_str(part);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        let (instr, rest) = current.split_once(char::is_whitespace).unwrap_or((&current, ""));
        out.push((instr.to_ascii_uppercase(), rest.trim().to_string()));
        current.clear();
    }
    out
}

#[test]
fn the_dockerfile_builds_what_the_tests_build_and_runs_unprivileged() {
    let text = read(&Path::new(ROOT).join("Dockerfile"));
    let instrs = dockerfile_instructions(&text);
    let froms: Vec<usize> = instrs
        .iter()
        .enumerate()
        .filter(|(_, (i, _))| i == "FROM")
        .map(|(n, _)| n)
        .collect();
    assert!(froms.len() >= 2, "multi-stage: a build stage and a runtime stage");
    let (build, runtime) = instrs.split_at(*froms.last().expect("a FROM"));
    let build_stage = build[froms[0]].1.rsplit(' ').next().expect("stage name").to_string();
    assert!(build[froms[0]].1.contains(" AS "), "the build stage is named");

    // The release build the tests run: `cargo build --release --locked`, default target and
    // features, so the image holds the binary CI tests.
    let runs: Vec<&String> = build.iter().filter(|(i, _)| i == "RUN").map(|(_, r)| r).collect();
    let cargo = runs
        .iter()
        .find(|r| r.contains("cargo build"))
        .expect("a RUN with cargo build");
    assert!(cargo.contains("cargo build --release --locked"), "{cargo}");
    for flag in ["--target", "--features", "--no-default-features", "--all-features"] {
        assert!(
            !cargo.contains(flag),
            "the image must build like the tests do, without {flag}: {cargo}"
        );
    }
    let bin = Path::new(common::BIN)
        .file_name()
        .expect("binary name")
        .to_string_lossy()
        .into_owned();
    assert!(
        cargo.contains(&format!("target/release/{bin}")),
        "{cargo} copies out the {bin} binary"
    );

    // The runtime stage: the binary on PATH, a numeric non-root user, the entry point and the
    // default state directory.
    let get = |name: &str| -> Vec<&String> { runtime.iter().filter(|(i, _)| i == name).map(|(_, r)| r).collect() };
    let copy = get("COPY");
    assert!(
        copy.iter()
            .any(|c| c.starts_with(&format!("--from={build_stage} ")) && c.ends_with(&format!("/usr/local/bin/{bin}"))),
        "the runtime stage copies the binary to /usr/local/bin: {copy:?}"
    );
    let user = get("USER");
    let user = user.last().expect("a USER in the runtime stage");
    let uid: i64 = user
        .split(':')
        .next()
        .expect("uid")
        .parse()
        .expect("a numeric uid, so runAsNonRoot can check it");
    assert_eq!(uid, IMAGE_UID, "the manifests run as {IMAGE_UID}");
    assert_eq!(get("ENTRYPOINT").last().map(|s| s.as_str()), Some(r#"["causeway"]"#));
    for (k, v) in IMAGE_ENV {
        assert!(get("ENV").iter().any(|e| *e == &format!("{k}={v}")), "ENV {k}={v}");
    }

    // The context keeps the sources and drops build output and secrets.
    let ignore = read(&Path::new(ROOT).join(".dockerignore"));
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for needed in ["Cargo.toml", "Cargo.lock", "src", "src/", "*", "**"] {
        assert!(!patterns.contains(&needed), ".dockerignore drops {needed}");
    }
    for dropped in ["target/", ".git/", "**/*.token"] {
        assert!(patterns.contains(&dropped), ".dockerignore keeps {dropped}");
    }
    let readme = read(&Path::new(ROOT).join("README.md"));
    assert!(
        readme.contains("docker build -t causeway"),
        "README.md documents the image build"
    );
}

/// `causeway intercept install` runs `nft`, so the image that a manifest runs it from must
/// hold nftables.
#[test]
fn the_image_has_nft_where_a_manifest_installs_the_intercept_rule() {
    let m = check_objects(&deploy_docs());
    let report = check_causeway_containers(&m);
    let installers: Vec<&ReadConfig> = report
        .configs
        .iter()
        .filter(|r| r.reader == Reader::Intercept)
        .collect();
    if installers.is_empty() {
        return;
    }
    let text = read(&Path::new(ROOT).join("Dockerfile"));
    let instrs = dockerfile_instructions(&text);
    let last_from = instrs.iter().rposition(|(i, _)| i == "FROM").expect("a FROM");
    let installs_nftables = instrs[last_from..]
        .iter()
        .any(|(i, r)| i == "RUN" && r.contains("apt-get install") && r.split_whitespace().any(|w| w == "nftables"));
    assert!(
        installs_nftables,
        "{} container {} runs `causeway intercept install`, which needs `nft`: the Dockerfile's runtime stage \
         must install nftables",
        installers[0].pod, installers[0].container
    );
}

/// The words of a documented command line that follow `causeway`: the line itself, after
/// `kubectl exec … --` or `cargo run … --`, or after the causeway image in `docker run`.
fn causeway_argv(words: &[String]) -> Option<Vec<String>> {
    let mut argv = vec!["causeway".to_string()];
    if words[0] == "causeway" {
        argv.extend(words[1..].iter().cloned());
        return Some(argv);
    }
    if words[0] == "docker" && words.get(1).is_some_and(|w| w == "run") {
        let at = words.iter().position(|w| w.starts_with("causeway:"))?;
        argv.extend(words[at + 1..].iter().cloned());
        return Some(argv);
    }
    if ["kubectl", "cargo"].contains(&words[0].as_str()) {
        let at = words.iter().position(|w| w == "--")?;
        match words.get(at + 1).map(String::as_str) {
            Some("causeway") => argv.extend(words[at + 2..].iter().cloned()),
            _ if words[0] == "cargo" => argv.extend(words[at + 1..].iter().cloned()),
            _ => return None,
        }
        return Some(argv);
    }
    None
}

#[test]
fn causeway_commands_in_the_docs_parse() {
    let mut files = vec![
        Path::new(ROOT).join("README.md"),
        Path::new(ROOT).join("tokens/README.md"),
    ];
    let mut stack = vec![Path::new(ROOT).join("deploy")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "md") {
                files.push(p);
            }
        }
    }
    let mut checked = 0;
    for file in files {
        let text = read(&file);
        let mut in_block = false;
        let mut shell = false;
        let mut block = String::new();
        let mut start = 0;
        for (n, line) in text.lines().enumerate() {
            if let Some(info) = line.trim_start().strip_prefix("```") {
                if in_block {
                    if shell {
                        let origin = format!("{}:{}", rel(&file), start + 1);
                        // Variables in docs are placeholders; keep them visible.
                        let var = |name: &str| format!("<{name}>");
                        for words in shell_commands(&block, &var) {
                            if let Some(argv) = causeway_argv(&words) {
                                // Panics unless the CLI accepts the line.
                                parse_cli(&argv, &origin);
                                checked += 1;
                            }
                        }
                    }
                    block.clear();
                    in_block = false;
                } else {
                    in_block = true;
                    shell = matches!(info.trim(), "sh" | "bash" | "shell");
                    start = n + 1;
                }
                continue;
            }
            if in_block {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    assert!(checked >= 20, "only {checked} documented causeway commands found");
}
