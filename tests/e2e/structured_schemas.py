"""JSON Schema corpus for tests/e2e/test_structured_outputs.py.

SCHEMAS is a list of (name, prompt, schema). Every prompt asks for data from a
short, synthetic clinical text (the people, numbers and record ids are made up);
the model (SmolLM2-135M-Instruct) is too small to follow a schema unaided, so
every valid output is the constraint's doing.

The corpus exercises, each at least once (checked at import, with every schema
meta-validated by Draft202012Validator.check_schema): objects with properties,
required, additionalProperties false and a schema, maxProperties; arrays with
items, prefixItems, minItems, maxItems; enum of strings, of numbers, mixed;
const; string minLength, maxLength, pattern and format (date, date-time, time,
email, uuid); integer and number minimum, maximum, exclusiveMinimum,
exclusiveMaximum, multipleOf; anyOf, oneOf (with a const discriminator, so the
branches are provably disjoint), allOf; $ref into $defs, recursive through
$defs and through the root ("#"); nullable types as a type list and as anyOf
with null; booleans; nested objects; arrays of objects; top-level array,
string, integer and enum schemas.

Free strings carry a maxLength and numbers a range, so outputs end well within
the test's max_tokens; arrays carry maxItems. Needs `jsonschema>=4.18`
(scripts/e2e.sh installs it into the e2e virtualenv).
"""

from jsonschema import Draft202012Validator


def s(max_length=40, **kw):
    """A bounded free string."""
    return {"type": "string", "maxLength": max_length, **kw}


def i(minimum, maximum, **kw):
    return {"type": "integer", "minimum": minimum, "maximum": maximum, **kw}


def num(minimum, maximum, **kw):
    return {"type": "number", "minimum": minimum, "maximum": maximum, **kw}


def arr(items, max_items, **kw):
    return {"type": "array", "items": items, "maxItems": max_items, **kw}


def obj(properties, required=None, additional=False, **kw):
    """An object; every property required unless `required` says otherwise."""
    out = {"type": "object", "properties": properties,
           "required": list(properties) if required is None else required}
    if additional is not None:
        out["additionalProperties"] = additional
    out.update(kw)
    return out


FREQUENCY = {"type": "string", "enum": ["once daily", "twice daily", "three times daily", "as needed"]}
ROUTE = {"type": "string", "enum": ["oral", "intravenous", "topical", "inhaled"]}
ICD_LIKE = {"type": "string", "pattern": "^[A-Z][0-9]{2}(\\.[0-9]{1,2})?$"}

SCHEMAS = [
    # --- a typical extraction: ~6 fields, one array of objects ------------------------------
    ("intake_extraction",
     "Extract the patient details and medications from this synthetic note as JSON.\n"
     "Note: Test patient Alex Sample, 54 years old, female, seen 2024-03-14. Allergies: penicillin. "
     "Takes metformin 500 mg twice daily and lisinopril 10 mg once daily.",
     obj({
         "patient_name": s(40),
         "age": i(0, 120),
         "sex": {"type": "string", "enum": ["female", "male", "other", "unknown"]},
         "visit_date": {"type": "string", "format": "date"},
         "allergies": arr(s(30), 4),
         "medications": arr(obj({"name": s(30), "dose_mg": num(0, 5000), "frequency": FREQUENCY}), 4),
     })),
    ("discharge_summary",
     "Summarise this synthetic discharge letter as JSON.\n"
     "Letter: Sam Placeholder was admitted on 2023-11-02 with community-acquired pneumonia (J18.9) "
     "and discharged on 2023-11-06 on amoxicillin 500 mg oral. Follow up in the chest clinic in 6 weeks.",
     obj({
         "patient_name": s(40),
         "admission_date": {"type": "string", "format": "date"},
         "discharge_date": {"type": ["string", "null"], "format": "date"},
         "diagnoses": arr(obj({"code": ICD_LIKE, "label": s(40), "primary": {"type": "boolean"}}), 3),
         "medications": arr(obj({"name": s(30), "dose_mg": i(1, 2000), "route": ROUTE}), 4),
         "follow_up": {"anyOf": [obj({"clinic": s(30), "weeks": i(1, 52)}), {"type": "null"}]},
     })),
    # --- scalars and bounds -------------------------------------------------------------------
    ("vital_signs",
     "Record these synthetic vital signs as JSON: BP 128/82, HR 76, temperature 37.1 C, SpO2 97%.",
     obj({
         "systolic": i(50, 250),
         "diastolic": i(30, 150),
         "heart_rate": i(20, 250),
         "temperature_c": {"type": "number", "exclusiveMinimum": 30, "exclusiveMaximum": 45},
         "spo2_percent": i(50, 100),
     })),
    ("triage_category",
     "Classify the urgency of this synthetic case as JSON: a test patient with a sprained ankle, "
     "walking, stable vital signs.",
     {"type": "string", "enum": ["immediate", "very urgent", "urgent", "standard", "non-urgent"]}),
    ("pain_score",
     "Give the pain score from this synthetic note as a JSON number: 'Pain reported as 6 out of 10.'",
     {"type": "integer", "minimum": 0, "maximum": 10}),
    ("symptom_flags",
     "Which symptoms does this synthetic note report? Answer as JSON. "
     "Note: fever for two days and a dry cough, no shortness of breath.",
     obj({"fever": {"type": "boolean"}, "cough": {"type": "boolean"},
          "shortness_of_breath": {"type": "boolean"}})),
    ("body_measurements",
     "Extract the measurements from this synthetic record as JSON: weight 72.5 kg, height 171 cm, BMI 24.8.",
     obj({
         "weight_kg": num(1, 300),
         "height_cm": i(40, 250),
         "bmi": {"type": "number", "exclusiveMinimum": 10, "exclusiveMaximum": 60},
     })),
    ("infusion_schedule",
     "Extract the dosing from this synthetic order as JSON: vancomycin 1250 mg every 12 hours.",
     obj({
         "drug": s(30),
         "dose_mg": {"type": "integer", "multipleOf": 5, "minimum": 5, "maximum": 2000},
         "interval_hours": {"type": "number", "multipleOf": 0.5, "minimum": 0.5, "maximum": 48},
     })),
    ("gestation",
     "Extract the gestational age from this synthetic antenatal note as JSON: 'Gestation 32+4 weeks.'",
     obj({
         "weeks": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 45},
         "days": i(0, 6),
     })),
    # --- enum and const -----------------------------------------------------------------------
    ("reaction_grade_mixed_enum",
     "Grade the drug reaction in this synthetic note as JSON: 'Mild itchy rash after the first dose.'",
     obj({"drug": s(30), "grade": {"enum": ["mild", "moderate", 3, 4.5, False, None]}})),
    ("dose_numeric_enum",
     "Extract the tablet order from this synthetic prescription as JSON: paracetamol 500 mg, one tablet, oral.",
     obj({
         "dose_mg": {"type": "integer", "enum": [250, 500, 1000]},
         "tablets": {"type": "number", "enum": [0.5, 1, 2]},
         "route": ROUTE,
     })),
    ("const_header",
     "Wrap this synthetic observation in the export header, as JSON: 'Patient resting comfortably.'",
     obj({
         "schema_version": {"const": "2.1"},
         "dataset": {"type": "string", "const": "synthetic-demo"},
         "revision": {"const": 3},
         "note": s(40),
     })),
    ("units_unicode_enum",
     "Extract the infusion amount and unit from this synthetic chart as JSON: 'Heparin 500 µg per hour.'",
     obj({"amount": num(0, 1000), "unit": {"type": "string", "enum": ["mg", "µg", "mL/h", "units/h"]}})),
    ("consent_record",
     "Record the consent from this synthetic note as JSON: 'Verbal consent given, no witness present.'",
     obj({
         "consent_given": {"type": "boolean"},
         "witness_present": {"type": "boolean"},
         "method": {"type": "string", "enum": ["verbal", "written", "electronic"]},
     })),
    # --- strings: lengths, patterns, formats ------------------------------------------------
    ("string_lengths",
     "Summarise this synthetic note as JSON with the clinician's initials: "
     "'Reviewed by Dr J K Example. Wound healing well, dressing changed.'",
     obj({
         "summary": {"type": "string", "minLength": 10, "maxLength": 80},
         "initials": {"type": "string", "minLength": 2, "maxLength": 3, "pattern": "^[A-Z]+$"},
     })),
    ("diagnosis_code",
     "Code the diagnosis in this synthetic note as JSON: 'Type 2 diabetes mellitus without complications (E11.9).'",
     obj({"code": ICD_LIKE, "description": s(60), "primary": {"type": "boolean"}})),
    ("contact_details",
     "Extract the contact details from this synthetic referral as JSON: "
     "'Contact Pat Example at pat.example@example.org or +15550100.'",
     obj({
         "name": s(40),
         "email": {"type": "string", "format": "email", "maxLength": 60},
         "phone": {"type": "string", "pattern": "^\\+?[0-9]{7,12}$"},
     })),
    ("record_reference",
     "Give the record reference of this synthetic document as JSON: "
     "'Record 123e4567-e89b-12d3-a456-426614174000, version 1, synthetic source.'",
     obj({
         "record_id": {"type": "string", "format": "uuid"},
         "version": {"type": "integer", "const": 1},
         "source": {"const": "synthetic"},
     })),
    ("appointment_slot",
     "Extract the appointment from this synthetic letter as JSON: "
     "'Your appointment is on 2024-05-20 at 09:30:00Z in the Test Clinic.'",
     obj({
         "date": {"type": "string", "format": "date"},
         "time": {"type": "string", "format": "time"},
         "clinic": s(40),
     })),
    ("lab_timestamp",
     "Extract the lab result from this synthetic report as JSON: "
     "'Potassium 4.2 mmol/L, collected 2024-01-09T07:45:00Z.'",
     obj({
         "test": {"type": "string", "enum": ["sodium", "potassium", "glucose", "creatinine"]},
         "collected_at": {"type": "string", "format": "date-time"},
         "value": num(0, 100),
         "unit": {"const": "mmol/L"},
     })),
    ("shift_times",
     "Extract the shift from this synthetic rota as JSON: 'Night shift 20:00:00+00:00 to 08:00:00+00:00.'",
     obj({
         "shift": {"type": "string", "enum": ["day", "night"]},
         "start": {"type": "string", "format": "time"},
         "end": {"type": "string", "format": "time"},
     })),
    ("administration_events",
     "List the doses given in this synthetic medication chart as JSON: "
     "'Ondansetron given 2024-02-01T08:00:00Z by AB; again 2024-02-01T16:00:00Z by CD.'",
     {"type": "object", "properties": {
         "events": arr(obj({
             "drug": {"type": "string", "enum": ["ondansetron", "morphine", "paracetamol"]},
             "given_at": {"type": "string", "format": "date-time"},
             "nurse_initials": {"type": "string", "pattern": "^[A-Z]{2,3}$"},
         }), 3, minItems=1)},
      "required": ["events"], "additionalProperties": False}),
    # --- composition: anyOf, oneOf, allOf, nullable ----------------------------------------
    ("lab_value_anyof",
     "Extract the test result from this synthetic report as JSON: 'COVID-19 PCR: negative.'",
     obj({
         "test": s(30),
         "result": {"anyOf": [num(0, 1000), {"type": "string", "enum": ["positive", "negative", "inconclusive"]}]},
     })),
    ("order_oneof",
     "Turn this synthetic request into an order, as JSON: 'Please arrange a chest X-ray.'",
     {"oneOf": [
         obj({"kind": {"const": "lab"}, "test": s(30), "fasting": {"type": "boolean"}}),
         obj({"kind": {"const": "imaging"},
              "modality": {"type": "string", "enum": ["x-ray", "ct", "mri", "ultrasound"]},
              "body_part": s(30)}),
     ]}),
    ("contact_method_anyof",
     "Give the preferred contact method in this synthetic note as JSON: 'Prefers email: test.user@example.com.'",
     obj({"preferred": {"anyOf": [
         obj({"phone": {"type": "string", "pattern": "^[0-9]{7,11}$"}}),
         obj({"email": {"type": "string", "format": "email", "maxLength": 60}}),
     ]}})),
    ("identifier_allof",
     "Extract the identifiers from this synthetic wristband as JSON: 'MRN TEST-0042, ward B3.'",
     {"allOf": [
         {"type": "object", "properties": {"mrn": {"type": "string", "pattern": "^TEST-[0-9]{4}$"}},
          "required": ["mrn"]},
         {"properties": {"ward": {"type": "string", "enum": ["A1", "A2", "B3", "C4"]}}, "required": ["ward"]},
     ], "maxProperties": 2}),
    ("nullable_type_list",
     "Extract these synthetic fields as JSON, null when absent: 'Name: Chris (no middle name). Not yet discharged.'",
     obj({
         "first_name": s(20),
         "middle_name": {"type": ["string", "null"], "maxLength": 20},
         "discharge_date": {"type": ["string", "null"], "format": "date"},
     })),
    ("nullable_anyof",
     "Extract the follow-up plan from this synthetic note as JSON, null when absent: 'Review in 14 days; no referral.'",
     obj({
         "follow_up_days": {"anyOf": [i(1, 365), {"type": "null"}]},
         "referral_to": {"anyOf": [s(40), {"type": "null"}]},
     })),
    ("allergy_optional_fields",
     "Record the allergy in this synthetic note as JSON: 'Allergic to latex.'",
     obj({"allergen": s(30), "reaction": s(40),
          "severity": {"type": "string", "enum": ["mild", "moderate", "severe"]}},
         required=["allergen"])),
    # --- $ref, $defs, recursion ---------------------------------------------------------------
    ("dosing_defs",
     "Extract the morning and evening doses from this synthetic chart as JSON: "
     "'Insulin 10 units in the morning, 6 units in the evening, subcutaneous.'",
     {"$defs": {"dose": obj({"amount": num(0, 500), "unit": {"type": "string", "enum": ["units", "mg", "mL"]}})},
      "type": "object",
      "properties": {"morning": {"$ref": "#/$defs/dose"}, "evening": {"$ref": "#/$defs/dose"},
                     "route": {"type": "string", "enum": ["subcutaneous", "intravenous"]}},
      "required": ["morning", "evening", "route"], "additionalProperties": False}),
    ("problem_tree",
     "Write this synthetic problem list as a tree in JSON: 'Diabetes, with complications retinopathy and neuropathy.'",
     {"$defs": {"problem": {
         "type": "object",
         "properties": {"name": s(24), "children": arr({"$ref": "#/$defs/problem"}, 2)},
         "required": ["name"], "additionalProperties": False}},
      "$ref": "#/$defs/problem"}),
    ("care_plan_outline_root_ref",
     "Write this synthetic care plan as a nested outline in JSON: 'Mobilise: walk twice a day, then stairs.'",
     {"type": "object",
      "properties": {"step": s(30), "substeps": arr({"$ref": "#"}, 2)},
      "required": ["step"], "additionalProperties": False}),
    # --- nesting, arrays, maps ---------------------------------------------------------------
    ("nested_encounter",
     "Extract the encounter from this synthetic admission as JSON: "
     "'Robin Testcase of Sampletown, postcode ZZ1 1ZZ, admitted to the surgical ward, bed 12.'",
     obj({
         "patient": obj({"name": s(40), "address": obj({"town": s(30),
                                                        "postcode": {"type": "string",
                                                                     "pattern": "^[A-Z]{1,2}[0-9] [0-9][A-Z]{2}$"}})}),
         "encounter": obj({"ward": {"type": "string", "enum": ["medical", "surgical", "maternity"]},
                           "bed": i(1, 60)}),
     })),
    ("lab_panel_top_level_array",
     "List the results in this synthetic panel as a JSON array: "
     "'Sodium 139 mmol/L, potassium 4.1 mmol/L, urea 5.2 mmol/L.'",
     arr(obj({"test": s(20), "value": num(0, 1000), "unit": s(10)}), 5, minItems=1)),
    ("symptom_list_top_level_array",
     "List the symptoms in this synthetic note as a JSON array of strings: 'Headache, nausea and dizziness.'",
     arr(s(30), 5, minItems=1)),
    ("symptom_checklist",
     "Tick the symptoms present in this synthetic note, as JSON: 'Fever and chills, no rash.'",
     obj({"present": arr({"type": "string", "enum": ["fever", "chills", "rash", "cough", "fatigue"]}, 4,
                         minItems=2)})),
    ("score_map_additional_schema",
     "Give the scores in this synthetic assessment as JSON: 'Patient TEST-7: GCS 15, NEWS 2, Waterlow 10.'",
     {"type": "object", "properties": {"patient_ref": s(12)}, "required": ["patient_ref"],
      "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 100}, "maxProperties": 4}),
    ("blood_pressure_tuple",
     "Give this synthetic blood pressure reading as JSON: '142 over 91, left arm, sitting.'",
     obj({"reading": {"type": "array", "prefixItems": [i(50, 250), i(30, 150)], "items": False, "minItems": 2},
          "arm": {"type": "string", "enum": ["left", "right"]}})),
    ("empty_acknowledgement",
     "Acknowledge receipt of this synthetic message with an empty JSON object: 'Results filed.'",
     {"type": "object", "properties": {}, "additionalProperties": False}),
]


def _keys(schema, found):
    """Collects every keyword (and each format) used anywhere in a schema."""
    if isinstance(schema, dict):
        for k, v in schema.items():
            found.add(k)
            if k == "format":
                found.add("format:" + v)
            if k == "type" and isinstance(v, list):
                found.add("type-list")
            if k == "enum" and len({type(x) for x in v}) > 1:
                found.add("enum-mixed")
            if k == "enum" and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                found.add("enum-numbers")
            if k == "additionalProperties":
                found.add("additionalProperties:" + ("false" if v is False else "schema"))
            if k == "$ref" and v == "#":
                found.add("ref-root")
            if k in ("properties", "$defs"):
                for sub in v.values():
                    _keys(sub, found)
            else:
                _keys(v, found)
    elif isinstance(schema, list):
        for v in schema:
            _keys(v, found)


REQUIRED_COVERAGE = {
    "properties", "required", "additionalProperties:false", "additionalProperties:schema", "items",
    "prefixItems", "minItems", "maxItems", "enum", "enum-mixed", "enum-numbers", "const", "minLength",
    "maxLength", "pattern", "format:date", "format:date-time", "format:time", "format:email", "format:uuid",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "anyOf", "oneOf", "allOf",
    "$ref", "$defs", "ref-root", "type-list", "maxProperties",
}

_names = [name for name, _, _ in SCHEMAS]
assert len(SCHEMAS) >= 32, len(SCHEMAS)
assert len(set(_names)) == len(_names), "duplicate schema names"
for _name, _prompt, _schema in SCHEMAS:
    # OpenAI's json_schema.name: ^[a-zA-Z0-9_-]{1,64}$
    assert 0 < len(_name) <= 64 and all(c.isalnum() or c in "_-" for c in _name), _name
    assert isinstance(_prompt, str) and _prompt, _name
    Draft202012Validator.check_schema(_schema)
_found = set()
for _, _, _schema in SCHEMAS:
    _keys(_schema, _found)
assert REQUIRED_COVERAGE <= _found, sorted(REQUIRED_COVERAGE - _found)
assert any(sc.get("type") == "array" for _, _, sc in SCHEMAS), "no top-level array"
assert any(sc.get("type") in ("string", "integer") for _, _, sc in SCHEMAS), "no top-level scalar"


def _self_referencing_defs(schema):
    """Names of the $defs entries whose own body refers back to them (recursion through $defs)."""
    return [k for k, v in schema.get("$defs", {}).items() if f'"#/$defs/{k}"' in repr(v).replace("'", '"')]


assert any(_self_referencing_defs(sc) for _, _, sc in SCHEMAS), "no recursive $defs entry"

BY_NAME = {name: (prompt, schema) for name, prompt, schema in SCHEMAS}
