//! The emulator's GraphQL endpoint: documents parsed with `graphql-parser` (inline literal
//! arguments and variables, aliases, operation names, fragment spreads and inline fragments),
//! validated against a small schema of what RunPod's public clients use, executed against the
//! [`World`], and answered with exactly the selected fields under their aliases.
//!
//! Served: `myself { pods networkVolumes … }`, `pod(input: {podId})`, `gpuTypes(input: {id})`
//! with `lowestPrice(input: {gpuCount})`, and the mutations `podFindAndDeployOnDemand`,
//! `podRentInterruptable`, `podResume`, `podBidResume`, `podStop`, `podTerminate`.
//!
//! Errors follow RunPod: a malformed or invalid document (syntax, unknown field, argument or
//! input field, missing operation name) is HTTP 400 with `errors` and no `data`; a refused
//! operation (no capacity, unknown pod, bid too low) is HTTP 200 with the field `null` in
//! `data` and an error carrying its `path` and `extensions.code = "RUNPOD"`.

use std::collections::{BTreeMap, HashMap};

use graphql_parser::query::{
    parse_query, Definition, Document, Field, FragmentDefinition, OperationDefinition, Selection,
    SelectionSet, TypeCondition, Value as GValue, VariableDefinition,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::world::{CreateRequest, Problem, World};

/// Fragments nested deeper than this are refused (a cycle or an abusive document).
const MAX_DEPTH: usize = 32;
/// Documents whose brackets nest deeper than this are refused before parsing: the parser is
/// recursive, and RunPod's deepest real query nests 5 levels.
const MAX_NESTING: usize = 64;

/// What a GraphQL request ends in.
pub(super) enum Outcome {
    /// HTTP 200 with this body (`data`, and `errors` for refused operations).
    Answer(Value),
    /// HTTP 400: the request or document is invalid; nothing was executed.
    Invalid(Value),
    /// HTTP 500 after the operation took effect (`faults.error_after_create`).
    ServerErrorAfterCreate,
}

fn invalid(code: &str, message: impl Into<String>) -> Outcome {
    Outcome::Invalid(json!({"errors": [{"message": message.into(), "extensions": {"code": code}}]}))
}

/// The shape of one output field: a leaf or an object of the named type (lists are implied
/// by the value).
#[derive(Clone, Copy)]
enum Kind {
    Leaf(&'static str),
    Object(&'static str),
}

/// (field, kind, accepted arguments).
type FieldDef = (&'static str, Kind, &'static [&'static str]);

const INPUT: &[&str] = &["input"];
const NONE: &[&str] = &[];

/// The schema subset: the fields of each object type.
fn fields_of(ty: &str) -> &'static [FieldDef] {
    use Kind::{Leaf, Object};
    match ty {
        "Query" => &[
            ("myself", Object("User"), NONE),
            ("pod", Object("Pod"), INPUT),
            ("gpuTypes", Object("GpuType"), INPUT),
        ],
        "Mutation" => &[
            ("podFindAndDeployOnDemand", Object("Pod"), INPUT),
            ("podRentInterruptable", Object("Pod"), INPUT),
            ("podResume", Object("Pod"), INPUT),
            ("podBidResume", Object("Pod"), INPUT),
            ("podStop", Object("Pod"), INPUT),
            ("podTerminate", Leaf("Void"), INPUT),
        ],
        "User" => &[
            ("id", Leaf("String"), NONE),
            ("pubKey", Leaf("String"), NONE),
            ("pods", Object("Pod"), NONE),
            ("networkVolumes", Object("NetworkVolume"), NONE),
        ],
        "NetworkVolume" => &[
            ("id", Leaf("String"), NONE),
            ("name", Leaf("String"), NONE),
            ("size", Leaf("Int"), NONE),
            ("dataCenterId", Leaf("String"), NONE),
        ],
        "Pod" => &[
            ("id", Leaf("String"), NONE),
            ("name", Leaf("String"), NONE),
            ("imageName", Leaf("String"), NONE),
            ("env", Leaf("[String]"), NONE),
            ("gpuCount", Leaf("Int"), NONE),
            ("vcpuCount", Leaf("Float"), NONE),
            ("memoryInGb", Leaf("Float"), NONE),
            ("containerDiskInGb", Leaf("Int"), NONE),
            ("volumeInGb", Leaf("Float"), NONE),
            ("volumeMountPath", Leaf("String"), NONE),
            ("costPerHr", Leaf("Float"), NONE),
            ("adjustedCostPerHr", Leaf("Float"), NONE),
            ("desiredStatus", Leaf("PodStatus"), NONE),
            ("lastStatusChange", Leaf("String"), NONE),
            ("dockerArgs", Leaf("String"), NONE),
            ("dockerId", Leaf("String"), NONE),
            ("machineId", Leaf("String"), NONE),
            ("podType", Leaf("PodType"), NONE),
            ("port", Leaf("Int"), NONE),
            ("ports", Leaf("String"), NONE),
            ("uptimeSeconds", Leaf("Int"), NONE),
            ("locked", Leaf("Boolean"), NONE),
            ("runtime", Object("PodRuntime"), NONE),
            ("machine", Object("PodMachineInfo"), NONE),
        ],
        "PodRuntime" => &[
            ("uptimeInSeconds", Leaf("Int"), NONE),
            ("gpus", Object("PodRuntimeGpus"), NONE),
            ("ports", Object("PodRuntimePorts"), NONE),
        ],
        "PodRuntimeGpus" => &[
            ("id", Leaf("String"), NONE),
            ("gpuUtilPercent", Leaf("Int"), NONE),
            ("memoryUtilPercent", Leaf("Int"), NONE),
        ],
        "PodRuntimePorts" => &[
            ("ip", Leaf("String"), NONE),
            ("isIpPublic", Leaf("Boolean"), NONE),
            ("privatePort", Leaf("Int"), NONE),
            ("publicPort", Leaf("Int"), NONE),
            ("type", Leaf("String"), NONE),
        ],
        "PodMachineInfo" => &[
            ("podHostId", Leaf("String"), NONE),
            ("gpuDisplayName", Leaf("String"), NONE),
        ],
        "GpuType" => &[
            ("id", Leaf("String"), NONE),
            ("displayName", Leaf("String"), NONE),
            ("manufacturer", Leaf("String"), NONE),
            ("memoryInGb", Leaf("Int"), NONE),
            ("cudaCores", Leaf("Int"), NONE),
            ("secureCloud", Leaf("Boolean"), NONE),
            ("communityCloud", Leaf("Boolean"), NONE),
            ("securePrice", Leaf("Float"), NONE),
            ("communityPrice", Leaf("Float"), NONE),
            ("secureSpotPrice", Leaf("Float"), NONE),
            ("communitySpotPrice", Leaf("Float"), NONE),
            ("oneWeekPrice", Leaf("Float"), NONE),
            ("oneMonthPrice", Leaf("Float"), NONE),
            ("threeMonthPrice", Leaf("Float"), NONE),
            ("maxGpuCount", Leaf("Int"), NONE),
            ("maxGpuCountSecureCloud", Leaf("Int"), NONE),
            ("maxGpuCountCommunityCloud", Leaf("Int"), NONE),
            ("lowestPrice", Object("LowestPrice"), INPUT),
        ],
        "LowestPrice" => &[
            ("minimumBidPrice", Leaf("Float"), NONE),
            ("uninterruptablePrice", Leaf("Float"), NONE),
            ("stockStatus", Leaf("String"), NONE),
            ("gpuName", Leaf("String"), NONE),
            ("gpuTypeId", Leaf("String"), NONE),
        ],
        _ => &[],
    }
}

fn field_def(ty: &str, name: &str) -> Option<FieldDef> {
    fields_of(ty).iter().copied().find(|f| f.0 == name)
}

/// A GraphQL request body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    query: String,
    #[serde(default)]
    variables: Option<Map<String, Value>>,
    #[serde(default)]
    operation_name: Option<String>,
}

/// Parses, validates and executes one GraphQL request against `world`.
pub(super) fn execute(world: &mut World, body: &[u8]) -> Outcome {
    let req: Request = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return invalid(
                "BAD_REQUEST",
                format!("invalid GraphQL request body: {e}; send {{\"query\": \"…\", \"variables\": {{…}}}}"),
            )
        }
    };
    if nesting(&req.query) > MAX_NESTING {
        return invalid(
            "GRAPHQL_PARSE_FAILED",
            format!("Syntax Error: the document nests deeper than {MAX_NESTING} levels"),
        );
    }
    let doc: Document<'_, &str> = match parse_query(&req.query) {
        Ok(d) => d,
        Err(e) => {
            return invalid(
                "GRAPHQL_PARSE_FAILED",
                format!("Syntax Error: {}", e.to_string().trim()),
            )
        }
    };
    let mut fragments = HashMap::new();
    let mut operations = Vec::new();
    for def in &doc.definitions {
        match def {
            Definition::Fragment(f) => {
                fragments.insert(f.name, f);
            }
            Definition::Operation(o) => operations.push(o),
        }
    }
    fn name_of<'a>(o: &OperationDefinition<'a, &'a str>) -> Option<&'a str> {
        match o {
            OperationDefinition::Query(q) => q.name,
            OperationDefinition::Mutation(m) => m.name,
            OperationDefinition::Subscription(s) => s.name,
            OperationDefinition::SelectionSet(_) => None,
        }
    }
    let op = match (&req.operation_name, operations.as_slice()) {
        (Some(wanted), ops) => match ops.iter().find(|o| name_of(o) == Some(wanted.as_str())) {
            Some(o) => *o,
            None => {
                return invalid(
                    "GRAPHQL_VALIDATION_FAILED",
                    format!("Unknown operation named \"{wanted}\"."),
                )
            }
        },
        (None, [one]) => *one,
        (None, []) => {
            return invalid(
                "GRAPHQL_VALIDATION_FAILED",
                "The document has no operation.",
            )
        }
        (None, _) => {
            return invalid(
                "GRAPHQL_VALIDATION_FAILED",
                "Must provide operationName: the document contains several operations.",
            )
        }
    };
    let (root, var_defs, selection) = match op {
        OperationDefinition::SelectionSet(s) => ("Query", &[][..], s),
        OperationDefinition::Query(q) => {
            ("Query", q.variable_definitions.as_slice(), &q.selection_set)
        }
        OperationDefinition::Mutation(m) => (
            "Mutation",
            m.variable_definitions.as_slice(),
            &m.selection_set,
        ),
        OperationDefinition::Subscription(_) => {
            return invalid(
                "GRAPHQL_VALIDATION_FAILED",
                "subscription operations are not supported; send a query or a mutation",
            )
        }
    };
    let exec = Exec {
        variables: variables(var_defs, req.variables.as_ref()),
        fragments,
    };
    if let Err(message) = exec.validate(root, selection, 0) {
        return invalid("GRAPHQL_VALIDATION_FAILED", message);
    }
    if let Err(message) = exec.check_lowest_price_inputs(root, selection) {
        return invalid("BAD_USER_INPUT", message);
    }
    // Every root field's input is decoded before anything runs: an invalid input anywhere
    // means no side effect at all.
    let mut calls = Vec::new();
    for field in exec.fields(root, selection) {
        match exec.root_call(root, field) {
            Ok(c) => calls.push((field, c)),
            Err(message) => return invalid("BAD_USER_INPUT", message),
        }
    }
    let mut data = Map::new();
    let mut errors = Vec::new();
    for (field, call) in calls {
        let key = field.alias.unwrap_or(field.name);
        match run(world, call) {
            Ran::Value(v) => {
                let kind = field_def(root, field.name).map(|d| d.1);
                data.insert(key.to_owned(), exec.project(kind, &v, field));
            }
            Ran::Refused(message) => {
                data.insert(key.to_owned(), Value::Null);
                errors.push(json!({"message": message, "path": [key],
                                   "extensions": {"code": "RUNPOD"}}));
            }
            Ran::ErrorAfterCreate => return Outcome::ServerErrorAfterCreate,
        }
    }
    let mut answer = json!({ "data": data });
    if !errors.is_empty() {
        answer["errors"] = Value::Array(errors);
    }
    Outcome::Answer(answer)
}

/// The deepest bracket nesting (`{`, `[`, `(`) outside string literals.
fn nesting(text: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for c in text.chars() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' | '(' => {
                depth += 1;
                max = max.max(depth);
            }
            '}' | ']' | ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Variable values: the request's, else the definition's default, else null.
fn variables<'a>(
    defs: &[VariableDefinition<'a, &'a str>],
    given: Option<&Map<String, Value>>,
) -> Map<String, Value> {
    defs.iter()
        .map(|d| {
            let v = given
                .and_then(|g| g.get(d.name).cloned())
                .or_else(|| {
                    d.default_value
                        .as_ref()
                        .and_then(|v| literal(v, &Map::new()).ok())
                })
                .unwrap_or(Value::Null);
            (d.name.to_owned(), v)
        })
        .collect()
}

/// A GraphQL value as JSON, variables substituted; an undefined variable is an error.
fn literal<'a>(v: &GValue<'a, &'a str>, vars: &Map<String, Value>) -> Result<Value, String> {
    Ok(match v {
        GValue::Variable(name) => vars
            .get(*name)
            .cloned()
            .ok_or_else(|| format!("Variable \"${name}\" is not defined by the operation."))?,
        GValue::Int(n) => json!(n.as_i64()),
        GValue::Float(f) => json!(f),
        GValue::String(s) => json!(s),
        GValue::Boolean(b) => json!(b),
        GValue::Null => Value::Null,
        GValue::Enum(e) => json!(e),
        GValue::List(items) => Value::Array(
            items
                .iter()
                .map(|i| literal(i, vars))
                .collect::<Result<_, _>>()?,
        ),
        GValue::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| Ok(((*k).to_owned(), literal(v, vars)?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

struct Exec<'d, 'a> {
    variables: Map<String, Value>,
    fragments: HashMap<&'a str, &'d FragmentDefinition<'a, &'a str>>,
}

impl<'d, 'a> Exec<'d, 'a> {
    /// The fields of a selection on `ty`, fragments expanded (already validated).
    fn fields(&self, ty: &str, sel: &'d SelectionSet<'a, &'a str>) -> Vec<&'d Field<'a, &'a str>> {
        let mut out = Vec::new();
        self.collect(ty, sel, &mut out, 0);
        out
    }

    fn collect(
        &self,
        ty: &str,
        sel: &'d SelectionSet<'a, &'a str>,
        out: &mut Vec<&'d Field<'a, &'a str>>,
        depth: usize,
    ) {
        if depth > MAX_DEPTH {
            return;
        }
        for item in &sel.items {
            match item {
                Selection::Field(f) => out.push(f),
                Selection::FragmentSpread(s) => {
                    if let Some(f) = self.fragments.get(s.fragment_name) {
                        let TypeCondition::On(on) = f.type_condition;
                        if on == ty {
                            self.collect(ty, &f.selection_set, out, depth + 1);
                        }
                    }
                }
                Selection::InlineFragment(i) => {
                    let applies = match &i.type_condition {
                        None => true,
                        Some(TypeCondition::On(on)) => *on == ty,
                    };
                    if applies {
                        self.collect(ty, &i.selection_set, out, depth + 1);
                    }
                }
            }
        }
    }

    /// Checks a selection on `ty`: known fields and arguments, sub-selections exactly on
    /// objects, known fragments on the right type, no fragment cycles, defined variables.
    fn validate(
        &self,
        ty: &str,
        sel: &SelectionSet<'a, &'a str>,
        depth: usize,
    ) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!(
                "Selections nest deeper than {MAX_DEPTH} levels (a fragment spread within itself?)."
            ));
        }
        for item in &sel.items {
            match item {
                Selection::Field(f) => self.validate_field(ty, f, depth)?,
                Selection::FragmentSpread(s) => {
                    let Some(frag) = self.fragments.get(s.fragment_name) else {
                        return Err(format!("Unknown fragment \"{}\".", s.fragment_name));
                    };
                    let TypeCondition::On(on) = frag.type_condition;
                    check_condition(ty, on)?;
                    if depth >= MAX_DEPTH {
                        return Err(format!(
                            "Cannot spread fragment \"{}\" within itself.",
                            s.fragment_name
                        ));
                    }
                    self.validate(ty, &frag.selection_set, depth + 1)?;
                }
                Selection::InlineFragment(i) => {
                    if let Some(TypeCondition::On(on)) = &i.type_condition {
                        check_condition(ty, on)?;
                    }
                    self.validate(ty, &i.selection_set, depth + 1)?;
                }
            }
        }
        Ok(())
    }

    fn validate_field(&self, ty: &str, f: &Field<'a, &'a str>, depth: usize) -> Result<(), String> {
        if f.name == "__typename" {
            return if f.selection_set.items.is_empty() {
                Ok(())
            } else {
                Err("Field \"__typename\" must not have a selection since type \"String!\" has no subfields.".into())
            };
        }
        let Some((_, kind, args)) = field_def(ty, f.name) else {
            let hint = if f.name == "deployCpuPod" {
                " (CPU pods are not emulated; give a gpuTypeId)"
            } else {
                ""
            };
            return Err(format!(
                "Cannot query field \"{}\" on type \"{ty}\".{hint}",
                f.name
            ));
        };
        for (name, value) in &f.arguments {
            if !args.contains(name) {
                return Err(format!(
                    "Unknown argument \"{name}\" on field \"{ty}.{}\".",
                    f.name
                ));
            }
            literal(value, &self.variables)?;
        }
        match kind {
            Kind::Leaf(leaf) if !f.selection_set.items.is_empty() => Err(format!(
                "Field \"{}\" must not have a selection since type \"{leaf}\" has no subfields.",
                f.name
            )),
            Kind::Object(obj) if f.selection_set.items.is_empty() => Err(format!(
                "Field \"{}\" of type \"{obj}\" must have a selection of subfields. Did you mean \"{} {{ ... }}\"?",
                f.name, f.name
            )),
            Kind::Object(obj) => self.validate(obj, &f.selection_set, depth + 1),
            Kind::Leaf(_) => Ok(()),
        }
    }

    /// The `input` argument of a field as JSON (null when absent).
    fn input(&self, f: &Field<'a, &'a str>) -> Value {
        f.arguments
            .iter()
            .find(|(n, _)| *n == "input")
            .and_then(|(_, v)| literal(v, &self.variables).ok())
            .unwrap_or(Value::Null)
    }

    /// Decodes a root field into the call to make.
    fn root_call(&self, root: &str, f: &Field<'a, &'a str>) -> Result<Call, String> {
        let input = self.input(f);
        let name = f.name;
        Ok(match (root, name) {
            (_, "__typename") => Call::Typename(root.to_owned()),
            ("Query", "myself") => Call::Myself,
            ("Query", "pod") => Call::Pod(decode::<PodFilter>(name, "PodFilter", input)?.pod_id),
            ("Query", "gpuTypes") => Call::GpuTypes(if input.is_null() {
                None
            } else {
                decode::<GpuTypeFilter>(name, "GpuTypeFilter", input)?.id
            }),
            ("Mutation", "podFindAndDeployOnDemand") => {
                let d = decode::<DeployInput>(name, "PodFindAndDeployOnDemandInput", input)?;
                if d.bid_per_gpu.is_some() {
                    return Err(format!(
                        "Argument \"input\" of \"{name}\" has an invalid value: unknown field `bidPerGpu` (spot pods go through podRentInterruptable)"
                    ));
                }
                Call::Deploy(d.into_request(name, None)?)
            }
            ("Mutation", "podRentInterruptable") => {
                let d = decode::<DeployInput>(name, "PodRentInterruptableInput", input)?;
                let Some(bid) = d.bid_per_gpu else {
                    return Err(format!(
                        "Argument \"input\" of \"{name}\" has an invalid value: field `bidPerGpu` of type Float! is required"
                    ));
                };
                Call::Deploy(d.into_request(name, Some(bid))?)
            }
            ("Mutation", "podResume") => {
                let r = decode::<ResumeInput>(name, "PodResumeInput", input)?;
                if r.gpu_count == Some(0) {
                    return Err(format!("Argument \"input\" of \"{name}\" has an invalid value: gpuCount must be at least 1"));
                }
                Call::Resume(r.pod_id)
            }
            ("Mutation", "podBidResume") => {
                let r = decode::<BidResumeInput>(name, "PodBidResumeInput", input)?;
                Call::BidResume(r.pod_id, r.bid_per_gpu)
            }
            ("Mutation", "podStop") => {
                Call::Stop(decode::<PodOnly>(name, "PodStopInput", input)?.pod_id)
            }
            ("Mutation", "podTerminate") => {
                Call::Terminate(decode::<PodOnly>(name, "PodTerminateInput", input)?.pod_id)
            }
            _ => return Err(format!("Cannot query field \"{name}\" on type \"{root}\".")),
        })
    }

    /// Checks every `lowestPrice(input: …)` in a document is a valid `GpuLowestPriceInput`.
    fn check_lowest_price_inputs(
        &self,
        ty: &str,
        sel: &'d SelectionSet<'a, &'a str>,
    ) -> Result<(), String> {
        for f in self.fields(ty, sel) {
            if ty == "GpuType" && f.name == "lowestPrice" {
                let input = self.input(f);
                if !input.is_null() {
                    serde_json::from_value::<LowestPriceInput>(input).map_err(|e| {
                        format!("Argument \"input\" of \"lowestPrice\" has an invalid value (GpuLowestPriceInput): {e}")
                    })?;
                }
            }
            if let Some((_, Kind::Object(child), _)) = field_def(ty, f.name) {
                self.check_lowest_price_inputs(child, &f.selection_set)?;
            }
        }
        Ok(())
    }

    /// `source` shaped by the field's selection: only selected fields, under their aliases.
    fn project(&self, kind: Option<Kind>, source: &Value, field: &'d Field<'a, &'a str>) -> Value {
        match (kind, source) {
            (_, Value::Null) => Value::Null,
            (Some(Kind::Object(_)), Value::Array(items)) => {
                Value::Array(items.iter().map(|i| self.project(kind, i, field)).collect())
            }
            (Some(Kind::Object(ty)), obj) => {
                let mut out = Map::new();
                for f in self.fields(ty, &field.selection_set) {
                    let key = f.alias.unwrap_or(f.name);
                    let value = if f.name == "__typename" {
                        json!(ty)
                    } else if ty == "GpuType" && f.name == "lowestPrice" {
                        let count = self.input(f)["gpuCount"].as_u64().unwrap_or(1);
                        World::gql_lowest_price(obj, u32::try_from(count).unwrap_or(u32::MAX))
                    } else {
                        obj.get(f.name).cloned().unwrap_or(Value::Null)
                    };
                    let child = field_def(ty, f.name).map(|d| d.1);
                    let shaped = match child {
                        Some(Kind::Object(_)) => self.project(child, &value, f),
                        _ => value,
                    };
                    // Merge a field selected twice (e.g. once directly, once in a fragment).
                    match (out.get_mut(key), shaped) {
                        (Some(Value::Object(have)), Value::Object(more)) => have.extend(more),
                        (_, shaped) => {
                            out.insert(key.to_owned(), shaped);
                        }
                    }
                }
                Value::Object(out)
            }
            (_, leaf) => leaf.clone(),
        }
    }
}

fn check_condition(ty: &str, on: &str) -> Result<(), String> {
    if on == ty {
        Ok(())
    } else {
        Err(format!(
            "Fragment cannot be spread here as objects of type \"{ty}\" can never be of type \"{on}\"."
        ))
    }
}

/// Decodes an input object; unknown or mistyped fields are named in the error.
fn decode<T: DeserializeOwned>(field: &str, ty: &str, input: Value) -> Result<T, String> {
    if input.is_null() {
        return Err(format!(
            "Argument \"input\" of type \"{ty}!\" is required on field \"{field}\"."
        ));
    }
    serde_json::from_value(input)
        .map_err(|e| format!("Argument \"input\" of \"{field}\" has an invalid value ({ty}): {e}"))
}

/// What a root field does.
enum Call {
    Typename(String),
    Myself,
    Pod(String),
    GpuTypes(Option<String>),
    Deploy(CreateRequest),
    Resume(String),
    BidResume(String, f64),
    Stop(String),
    Terminate(String),
}

enum Ran {
    Value(Value),
    Refused(String),
    ErrorAfterCreate,
}

fn run(world: &mut World, call: Call) -> Ran {
    let fresh = |world: &World, id: &str| match world.gql_pod_fresh(id) {
        Some(v) => Ran::Value(v),
        None => Ran::Refused(format!("pod {id} not found")),
    };
    let after = |world: &World, r: Result<Value, Problem>, id: &str| match r {
        Ok(_) => fresh(world, id),
        Err(p) => Ran::Refused(p.detail),
    };
    match call {
        Call::Typename(root) => Ran::Value(json!(root)),
        Call::Myself => Ran::Value(json!({
            "id": "user_emulator", "pubKey": world.ssh_keys_json()["keys"]
                .as_array()
                .map(|k| k.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("\n"))
                .unwrap_or_default(),
            "pods": world.gql_pods(), "networkVolumes": [],
        })),
        Call::Pod(id) => Ran::Value(world.gql_pod(&id).unwrap_or(Value::Null)),
        Call::GpuTypes(id) => Ran::Value(Value::Array(world.gql_gpu_types(id.as_deref()))),
        Call::Deploy(req) => match world.create(req) {
            Ok(_) if world.take_error_after_create() => Ran::ErrorAfterCreate,
            Ok(id) => fresh(world, &id),
            Err(p) => Ran::Refused(p.detail),
        },
        Call::Resume(id) => {
            let r = world.action(&id, "start");
            after(world, r, &id)
        }
        Call::BidResume(id, bid) => {
            let r = world.bid_resume(&id, bid);
            after(world, r, &id)
        }
        Call::Stop(id) => {
            let r = world.action(&id, "stop");
            after(world, r, &id)
        }
        Call::Terminate(id) => match world.terminate(&id) {
            Ok(()) => Ran::Value(Value::Null),
            Err(_) => Ran::Refused("pod not found to terminate".into()),
        },
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PodFilter {
    pod_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PodOnly {
    pod_id: String,
    #[serde(default)]
    #[allow(dead_code)] // accepted as RunPod does; not emulated
    increment_version: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ResumeInput {
    pod_id: String,
    #[serde(default)]
    gpu_count: Option<u32>,
    #[serde(default)]
    #[allow(dead_code)] // accepted as RunPod does; not emulated
    sync_machine: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BidResumeInput {
    pod_id: String,
    bid_per_gpu: f64,
    #[serde(default)]
    #[allow(dead_code)] // the pod keeps its GPUs
    gpu_count: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GpuTypeFilter {
    #[serde(default)]
    id: Option<String>,
}

/// `GpuLowestPriceInput` is read leniently by `project` (only `gpuCount` matters); this
/// list is what RunPod documents, so a typo is still caught.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)] // validation only
struct LowestPriceInput {
    #[serde(default)]
    gpu_count: Option<u32>,
    #[serde(default)]
    min_disk: Option<u32>,
    #[serde(default)]
    min_memory_in_gb: Option<u32>,
    #[serde(default)]
    min_vcpu_count: Option<u32>,
    #[serde(default)]
    secure_cloud: Option<bool>,
    #[serde(default)]
    support_public_ip: Option<bool>,
    #[serde(default)]
    data_center_id: Option<String>,
    #[serde(default)]
    country_code: Option<String>,
    #[serde(default)]
    min_download: Option<u32>,
    #[serde(default)]
    min_upload: Option<u32>,
}

/// `PodFindAndDeployOnDemandInput` / `PodRentInterruptableInput` (the latter adds
/// `bidPerGpu`): every field RunPod's SDK sends is accepted; unknown fields are refused.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DeployInput {
    #[serde(default)]
    bid_per_gpu: Option<f64>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    image_name: Option<String>,
    #[serde(default)]
    template_id: Option<String>,
    #[serde(default)]
    gpu_type_id: Option<String>,
    #[serde(default)]
    gpu_count: Option<u32>,
    #[serde(default)]
    cloud_type: Option<String>,
    #[serde(default)]
    data_center_id: Option<String>,
    #[serde(default)]
    ports: Option<String>,
    #[serde(default)]
    env: Option<Vec<EnvVar>>,
    #[serde(default)]
    start_ssh: Option<bool>,
    #[serde(default)]
    container_disk_in_gb: Option<u32>,
    #[serde(default)]
    volume_in_gb: Option<u32>,
    #[serde(default)]
    #[allow(dead_code)] // accepted as RunPod does; not emulated
    support_public_ip: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)] // accepted as RunPod does; not emulated
    start_jupyter: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)] // accepted as RunPod does; not emulated
    min_vcpu_count: Option<u32>,
    #[serde(default)]
    #[allow(dead_code)] // accepted as RunPod does; not emulated
    min_memory_in_gb: Option<u32>,
    #[serde(default)]
    #[allow(dead_code)] // accepted as RunPod does; not emulated
    docker_args: Option<String>,
    #[serde(default)]
    #[allow(dead_code)] // accepted as RunPod does; not emulated
    volume_mount_path: Option<String>,
    #[serde(default)]
    #[allow(dead_code)] // accepted as RunPod does; not emulated
    country_code: Option<String>,
    #[serde(default)]
    #[allow(dead_code)] // accepted as RunPod does; not emulated
    network_volume_id: Option<String>,
    #[serde(default)]
    #[allow(dead_code)] // accepted as RunPod does; not emulated
    allowed_cuda_versions: Option<Vec<String>>,
    #[serde(default)]
    #[allow(dead_code)] // accepted as RunPod does; not emulated
    min_download: Option<u32>,
    #[serde(default)]
    #[allow(dead_code)] // accepted as RunPod does; not emulated
    min_upload: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvVar {
    key: String,
    value: String,
}

impl DeployInput {
    fn into_request(self, field: &str, bid: Option<f64>) -> Result<CreateRequest, String> {
        let bad = |what: String| {
            format!("Argument \"input\" of \"{field}\" has an invalid value: {what}")
        };
        let name = self
            .name
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_default();
        let image = match (self.image_name.filter(|i| !i.is_empty()), self.template_id) {
            (Some(i), _) => i,
            (None, Some(t)) => format!("template:{t}"),
            (None, None) => {
                return Err(bad("imageName is required unless templateId is set".into()))
            }
        };
        let Some(gpu_type) = self.gpu_type_id else {
            return Err(bad(
                "gpuTypeId is required (CPU pods are not emulated)".into()
            ));
        };
        // ALL lets RunPod choose; the emulator takes the secure cloud.
        let cloud = match self.cloud_type.as_deref().unwrap_or("ALL") {
            "ALL" | "SECURE" => "SECURE",
            "COMMUNITY" => "COMMUNITY",
            other => {
                return Err(bad(format!(
                    "cloudType must be ALL, SECURE or COMMUNITY, not {other:?}"
                )))
            }
        };
        let env: BTreeMap<String, String> = self
            .env
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.key, e.value))
            .collect();
        Ok(CreateRequest {
            name,
            image,
            gpu_type,
            gpu_count: self.gpu_count.unwrap_or(1),
            cloud: cloud.to_owned(),
            env,
            ports: self
                .ports
                .map(|p| {
                    p.split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            disk: self.container_disk_in_gb.unwrap_or(20),
            volume_gb: self.volume_in_gb.unwrap_or(0),
            data_center_ids: self.data_center_id.into_iter().collect(),
            start_ssh: self.start_ssh.unwrap_or(false),
            bid,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::ManualClock;
    use crate::emulator::EmulatorConfig;
    use crate::model::Timestamp;

    fn world() -> World {
        let cfg = EmulatorConfig {
            sshd: false,
            ..EmulatorConfig::default()
        };
        World::new(cfg, Arc::new(ManualClock::new(Timestamp::from_secs(1)))).unwrap()
    }

    fn status(o: &Outcome) -> u16 {
        match o {
            Outcome::Answer(_) => 200,
            Outcome::Invalid(_) => 400,
            Outcome::ServerErrorAfterCreate => 500,
        }
    }

    #[test]
    fn hostile_documents_are_clean_errors_never_panics() {
        let mut w = world();
        let deep = format!("{}{}", "{ gpuTypes ".repeat(100_000), "}".repeat(100_000));
        let long_int = format!("{{ pod(input: {{podId: {}}}) {{ id }} }}", "9".repeat(400));
        let cases: Vec<(String, u16)> = vec![
            (deep, 400),
            (long_int, 400),
            ("".into(), 400),
            ("fragment F on Pod { id }".into(), 400),
            ("{ gpuTypes { ... on Pod { id } } }".into(), 400),
            (
                "{ gpuTypes(input: {id: [1, {a: null}]}) { id } }".into(),
                400,
            ),
            (
                "query($i: GpuTypeFilter = {id: \"NVIDIA H200\"}) { gpuTypes(input: $i) { id } }"
                    .into(),
                200,
            ),
            ("{ __typename }".into(), 200),
            (
                "mutation { podTerminate(input: {podId: \"\\u0000\"}) }".into(),
                200,
            ),
        ];
        for (query, want) in cases {
            let body = serde_json::to_vec(&json!({"query": query})).unwrap();
            let got = execute(&mut w, &body);
            assert_eq!(status(&got), want, "{}", &query[..query.len().min(80)]);
        }
        for body in [&b"not json"[..], b"{\"query\": 3}", b"{}"] {
            assert_eq!(status(&execute(&mut w, body)), 400);
        }
    }

    #[test]
    fn default_variable_values_apply() {
        let mut w = world();
        let body = serde_json::to_vec(&json!({"query":
            "query($i: GpuTypeFilter = {id: \"NVIDIA H200\"}) { gpuTypes(input: $i) { id } }"}))
        .unwrap();
        let Outcome::Answer(v) = execute(&mut w, &body) else {
            panic!("not answered")
        };
        assert_eq!(v, json!({"data": {"gpuTypes": [{"id": "NVIDIA H200"}]}}));
    }
}
